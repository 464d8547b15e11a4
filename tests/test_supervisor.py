"""The supervisor that keeps the embedded Triton running, on a stand-in child (no stack needed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _pid(path: Path, other_than: int | None = None, timeout_s: float = 10) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid = int(path.read_text())
            if pid != other_than and psutil.pid_exists(pid):
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no new child pid in {path} within {timeout_s}s")


def test_a_killed_child_is_restarted_and_stop_ends_both(tmp_path):
    pid_file = tmp_path / "child.pid"
    supervisor = subprocess.Popen([sys.executable, "-m", "es_ray.stack.supervisor", "--name", "sleeper",
                                   "--child-pid-file", str(pid_file), "--", "sleep", "600"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = _pid(pid_file)
        psutil.Process(first).kill()
        second = _pid(pid_file, other_than=first)
        assert psutil.Process(second).cmdline()[:2] == ["sleep", "600"]
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
        log = supervisor.stdout.read()
        assert "supervisor.child_exited" in log and "supervisor.stopped" in log
        assert not pid_file.exists()
    finally:
        supervisor.kill()
