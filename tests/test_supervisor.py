"""The supervisor that keeps the embedded Triton running, on a stand-in child (no stack needed)."""

from __future__ import annotations

import os
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
    # The child leaves a grandchild behind (as tritonserver leaves its python backend stubs).
    child = ["sh", "-c", "sleep 601 & exec sleep 600"]
    supervisor = subprocess.Popen([sys.executable, "-m", "es_ray.stack.supervisor", "--name", "sleeper",
                                   "--child-pid-file", str(pid_file), "--", *child],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = _pid(pid_file)
        time.sleep(0.5)
        grandchildren = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "601"]
                         and os.getpgid(p.pid) == first]
        assert len(grandchildren) == 1
        psutil.Process(first).kill()
        second = _pid(pid_file, other_than=first)
        assert psutil.Process(second).cmdline()[:2] == ["sleep", "600"]
        gone, _ = psutil.wait_procs(grandchildren, timeout=10)
        assert gone, "the dead child's own child was left running"
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
        log = supervisor.stdout.read()
        assert "supervisor.child_exited" in log and "supervisor.stopped" in log
        assert not pid_file.exists()
    finally:
        supervisor.kill()


def test_shared_memory_of_a_dead_child_is_removed_and_only_its_own(tmp_path):
    from es_ray.stack.supervisor import SHM_DIR

    prefix = f"esray_test_{os.getpid()}_"
    pid_file = tmp_path / "child.pid"
    # The child maps a region with the prefix, as the python backend does; another stack's stays.
    child = ["sh", "-c", f"touch {SHM_DIR}/{prefix}$$ && exec sleep 600"]
    other = SHM_DIR / f"esray_other_{os.getpid()}_region"
    other.touch()
    supervisor = subprocess.Popen([sys.executable, "-m", "es_ray.stack.supervisor", "--name", "sleeper",
                                   "--child-pid-file", str(pid_file), "--shm-prefix", prefix, "--", *child],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = _pid(pid_file)
        region = SHM_DIR / f"{prefix}{first}"
        deadline = time.monotonic() + 10
        while not region.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert region.exists()
        psutil.Process(first).kill()
        second = _pid(pid_file, other_than=first)
        assert not region.exists(), "the killed child's shared memory was left in /dev/shm"
        assert other.exists(), "another prefix's region was removed"
        deadline = time.monotonic() + 10
        while not (SHM_DIR / f"{prefix}{second}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=30) == 0
        assert not list(SHM_DIR.glob(f"{prefix}*")), "a stopped child's shared memory was left in /dev/shm"
    finally:
        supervisor.kill()
        other.unlink(missing_ok=True)
        for path in SHM_DIR.glob(f"{prefix}*"):
            path.unlink()
