"""Batch work runs at a lower OS priority (es_ray/priority.py): every thread of the process, not only the
one that asked (Linux keeps a nice value per thread). In a child process: a niceness cannot be undone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from es_ray.priority import THREADS

pytestmark = pytest.mark.skipif(not THREADS.exists(), reason="per-thread nice values are read from Linux's /proc")

CHILD = """
import json, os, sys, threading
from pathlib import Path
from es_ray.priority import run_as_batch

def nice_values():
    # field 19 of /proc/<pid>/task/<tid>/stat; the fields after the command name's ')' start at field 3
    return {t.name: int((t / "stat").read_text().rsplit(")", 1)[1].split()[16])
            for t in Path(f"/proc/{os.getpid()}/task").iterdir()}

os.nice(max(0, int(sys.argv[2]) - os.nice(0)))  # at least that nice (the test process may be nicer already)
start = os.nice(0)
waiting = threading.Event()
before = threading.Thread(target=waiting.wait)   # a thread started before, as Ray's own threads are
before.start()
answer = run_as_batch(int(sys.argv[1]))
after = threading.Thread(target=waiting.wait)    # one started afterwards, as torch's pool may be
after.start()
print(json.dumps({"start": start, "answer": answer, "threads": nice_values()}))
waiting.set()
"""


def run_child(nice: int, start_at: int = 0) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(nice), str(start_at)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_every_thread_of_a_batch_process_runs_at_the_configured_niceness():
    from es_ray.config import load_settings

    nice = load_settings().ray.batch_nice
    assert nice > 0, "configs/stack.yaml turns batch priority off: nothing to check"
    child = run_child(nice)
    expected = max(nice, child["start"])  # a process already nicer (the test run's own niceness) stays so
    assert len(child["threads"]) == 3 and child["answer"] == expected
    assert set(child["threads"].values()) == {expected}


def test_a_nicer_process_keeps_its_own_niceness():
    child = run_child(5, start_at=12)
    assert child["start"] >= 12
    assert child["answer"] == child["start"] and set(child["threads"].values()) == {child["start"]}
