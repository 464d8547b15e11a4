"""The Triton stub's ONNX Runtime arena (es_ray/inference/templates/triton_model.py): a large run no
longer shrinks the arena at its end; the stub shrinks it once no run has come for arena_shrink_idle_s,
so bulk work reuses the arena and an idle stub gives it back. ONNX Runtime is replaced by a recorder:
what is checked is which runs carry the shrink option, and when."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

TEMPLATE = Path(__file__).resolve().parents[1] / "es_ray" / "inference" / "templates" / "triton_model.py"


class RunOptions:
    def __init__(self):
        self.entries = {}

    def add_run_config_entry(self, key, value):
        self.entries[key] = value


class Session:
    """Records (input shape, shrinks?) per run; a run of `slow_rows` rows takes `slow_s`."""

    def __init__(self, path, options, providers):
        self.runs: list[tuple[tuple[int, ...], bool]] = []
        self.lock = threading.Lock()
        self.slow_rows, self.slow_s = None, 0.0

    def get_inputs(self):
        return [types.SimpleNamespace(name="input_ids"), types.SimpleNamespace(name="attention_mask")]

    def run(self, outputs, feeds, run_options=None):
        ids = feeds["input_ids"]
        if ids.shape[0] == self.slow_rows:
            time.sleep(self.slow_s)
        shrinks = bool(run_options and run_options.entries.get("memory.enable_memory_arena_shrinkage"))
        with self.lock:
            self.runs.append((ids.shape, shrinks))
        return [np.zeros((ids.shape[0], 4), dtype=np.float32)]


@pytest.fixture
def stub(monkeypatch):
    """(run, session) of the template's ONNX path with a recording session."""
    sessions = []

    def make_session(*args, **kwargs):
        sessions.append(Session(*args, **kwargs))
        return sessions[-1]

    ort = types.SimpleNamespace(SessionOptions=lambda: types.SimpleNamespace(), RunOptions=RunOptions,
                                InferenceSession=make_session,
                                GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99))
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("triton_model_under_test", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.np = np

    def build(shrink_above_tokens: int, idle_s: float):
        run = model._onnx("model.onnx", 1, shrink_above_tokens, idle_s)
        return run, sessions[-1]
    return build


def rows(n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ones((n, width), dtype=np.int64)
    return ids, ids.copy()


def shrinks(session: Session) -> list[tuple[int, ...]]:
    with session.lock:
        return [shape for shape, shrunk in session.runs if shrunk]


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_large_runs_leave_the_arena_until_the_stub_is_idle_then_one_token_run_shrinks_it(stub):
    run, session = stub(shrink_above_tokens=1024, idle_s=0.3)
    for _ in range(3):                 # bulk work: 16 x 256 = 4,096 tokens each, back to back
        assert run(*rows(16, 256)).shape == (16, 4)
    assert shrinks(session) == []      # none of them shrank at its end
    assert wait_for(lambda: shrinks(session) == [(1, 1)])   # idle: one one-token run with the option
    time.sleep(0.5)
    assert shrinks(session) == [(1, 1)]                      # once, not again while nothing ran


def test_small_runs_never_shrink_and_do_not_postpone_forever(stub):
    run, session = stub(shrink_above_tokens=1024, idle_s=0.3)
    for _ in range(5):
        run(*rows(16, 40))             # 640 tokens: a reindex request keeps its (small) arena
    time.sleep(0.5)
    assert shrinks(session) == []
    run(*rows(16, 256))
    run(*rows(16, 40))                 # a small run after the large one moves the idle clock on ...
    assert wait_for(lambda: shrinks(session) == [(1, 1)])   # ... and the shrink still comes


def test_a_run_in_progress_postpones_the_shrink(stub):
    run, session = stub(shrink_above_tokens=1024, idle_s=0.1)
    session.slow_rows, session.slow_s = 8, 0.6
    run(*rows(16, 256))
    slow = threading.Thread(target=run, args=rows(8, 256))
    slow.start()                       # running while the large run's idle time passes
    time.sleep(0.3)
    assert shrinks(session) == []
    slow.join()
    assert wait_for(lambda: shrinks(session) == [(1, 1)])


def test_idle_s_zero_shrinks_at_the_end_of_each_large_run(stub):
    run, session = stub(shrink_above_tokens=1024, idle_s=0)
    run(*rows(16, 256))
    run(*rows(16, 40))
    assert shrinks(session) == [(16, 256)]
