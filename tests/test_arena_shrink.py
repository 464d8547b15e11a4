"""The Triton stub's ONNX Runtime sessions (es_ray/inference/templates/triton_model.py): a large run no
longer shrinks the arena at its end; the stub shrinks it once no run has come for arena_shrink_idle_s,
so bulk work reuses the arena and an idle stub gives it back. A lone request runs on the lone-request
session (lone_request_threads), a batch on the other. ONNX Runtime is replaced by a recorder: what is
checked is which session runs what, which runs carry the shrink option, and when."""

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


class SessionOptions:
    def __init__(self):
        self.entries = {}

    def add_session_config_entry(self, key, value):
        self.entries[key] = value


class Session:
    """Records (input shape, shrinks?) per run; a run of `slow_rows` rows takes `slow_s`."""

    def __init__(self, path, options, providers):
        self.threads, self.entries = options.intra_op_num_threads, options.entries
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


class Request:
    """What the stub reads of a Triton request: its two input tensors."""

    def __init__(self, n: int, width: int):
        self.inputs = dict(zip(("input_ids__0", "attention_mask__1"), rows(n, width)))


def fake_backend_utils() -> types.ModuleType:
    utils = types.ModuleType("triton_python_backend_utils")
    utils.get_input_tensor_by_name = lambda request, name: types.SimpleNamespace(as_numpy=lambda: request.inputs[name])
    utils.Tensor = lambda name, array: array
    utils.InferenceResponse = lambda tensors: tensors[0]
    return utils


@pytest.fixture
def stub(monkeypatch):
    """build(...) -> (run, sessions, model): the template's ONNX path with recording sessions (the batch
    session first, then the lone-request one if there is one); run(ids, mask, alone=False)."""
    sessions = []

    def make_session(*args, **kwargs):
        sessions.append(Session(*args, **kwargs))
        return sessions[-1]

    ort = types.SimpleNamespace(SessionOptions=SessionOptions, RunOptions=RunOptions, InferenceSession=make_session,
                                GraphOptimizationLevel=types.SimpleNamespace(ORT_ENABLE_ALL=99))
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_backend_utils())
    spec = importlib.util.spec_from_file_location("triton_model_under_test", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.np = np

    def build(shrink_above_tokens: int, idle_s: float, threads: int = 1, lone_threads: int = 0):
        model.run = model._onnx("model.onnx", threads, lone_threads, shrink_above_tokens, idle_s)
        return (lambda ids, mask, alone=False: model.run(ids, mask, alone)), list(sessions), model
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
    run, (session,), _ = stub(shrink_above_tokens=1024, idle_s=0.3)
    for _ in range(3):                 # bulk work: 16 x 256 = 4,096 tokens each, back to back
        assert run(*rows(16, 256)).shape == (16, 4)
    assert shrinks(session) == []      # none of them shrank at its end
    assert wait_for(lambda: shrinks(session) == [(1, 1)])   # idle: one one-token run with the option
    time.sleep(0.5)
    assert shrinks(session) == [(1, 1)]                      # once, not again while nothing ran


def test_small_runs_never_shrink_and_do_not_postpone_forever(stub):
    run, (session,), _ = stub(shrink_above_tokens=1024, idle_s=0.3)
    for _ in range(5):
        run(*rows(16, 40))             # 640 tokens: a reindex request keeps its (small) arena
    time.sleep(0.5)
    assert shrinks(session) == []
    run(*rows(16, 256))
    run(*rows(16, 40))                 # a small run after the large one moves the idle clock on ...
    assert wait_for(lambda: shrinks(session) == [(1, 1)])   # ... and the shrink still comes


def test_a_run_in_progress_postpones_the_shrink(stub):
    run, (session,), _ = stub(shrink_above_tokens=1024, idle_s=0.1)
    session.slow_rows, session.slow_s = 8, 0.6
    run(*rows(16, 256))
    slow = threading.Thread(target=run, args=rows(8, 256))
    slow.start()                       # running while the large run's idle time passes
    time.sleep(0.3)
    assert shrinks(session) == []
    slow.join()
    assert wait_for(lambda: shrinks(session) == [(1, 1)])


def test_idle_s_zero_shrinks_at_the_end_of_each_large_run(stub):
    run, (session,), _ = stub(shrink_above_tokens=1024, idle_s=0)
    run(*rows(16, 256))
    run(*rows(16, 40))
    assert shrinks(session) == [(16, 256)]


def test_a_lone_request_runs_on_more_threads_and_a_batch_on_the_stub_threads(stub):
    run, (batch, lone), model = stub(shrink_above_tokens=1024, idle_s=0.3, threads=1, lone_threads=2)
    assert (batch.threads, lone.threads) == (1, 2)
    # both stop their pool's spinning when a run returns: an idle stub burns no CPU
    assert batch.entries["session.force_spinning_stop"] == lone.entries["session.force_spinning_stop"] == "1"
    out = model.execute([Request(1, 12)])          # Triton found nothing else queued
    assert [o.shape for o in out] == [(1, 4)]
    out = model.execute([Request(1, 12), Request(2, 7), Request(1, 9)])   # a batch: padded to 12, one run
    assert [o.shape for o in out] == [(1, 4), (2, 4), (1, 4)]
    out = model.execute([Request(16, 9)])         # alone but many rows: background work, not a search
    assert [o.shape for o in out] == [(16, 4)]
    assert [shape for shape, _ in lone.runs] == [(1, 12)]
    assert [shape for shape, _ in batch.runs] == [(4, 12), (16, 9)]


def test_a_lone_query_without_the_idle_shrink_thread_runs_on_the_lone_session(stub):
    run, (batch, lone), model = stub(shrink_above_tokens=1024, idle_s=0, threads=1, lone_threads=2)
    model.execute([Request(1, 12)])
    model.execute([Request(1, 12), Request(1, 3)])
    assert [shape for shape, _ in lone.runs] == [(1, 12)]
    assert [shape for shape, _ in batch.runs] == [(2, 12)]


@pytest.mark.parametrize("threads, lone_threads", [(1, 0), (1, 1), (0, 2)])  # none; no more than a batch's
def test_without_more_lone_threads_every_request_runs_on_one_session(stub, threads, lone_threads):
    run, sessions, model = stub(shrink_above_tokens=1024, idle_s=0.3, threads=threads, lone_threads=lone_threads)
    assert len(sessions) == 1
    model.execute([Request(1, 12)])
    model.execute([Request(1, 12), Request(1, 5)])
    assert [shape for shape, _ in sessions[0].runs] == [(1, 12), (2, 12)]


def test_the_idle_shrink_gives_back_both_sessions_arenas(stub):
    run, (batch, lone), _ = stub(shrink_above_tokens=1024, idle_s=0.1, threads=1, lone_threads=2)
    run(*rows(16, 256))
    assert wait_for(lambda: shrinks(batch) == [(1, 1)] and shrinks(lone) == [(1, 1)])
