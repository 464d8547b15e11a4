"""Keeps one child process running: restarts it when it exits, until this process is told to stop.

    python -m es_ray.stack.supervisor --name triton --child-pid-file F -- tritonserver ...

Each model version's embedded tritonserver runs under one, so a crashed or killed server is back within
seconds, with its models (they are on its command line: es_ray/stack/triton.py). SIGTERM or SIGINT stops the child
and then the supervisor. Restarts back off (1 s doubling to 30 s) while the child keeps dying young.
In between it sleeps until the child exits or a signal comes (no polling: an idle stack wakes it never).
The child runs in a process group of its own, and whatever of that group outlives it is killed: a
tritonserver that dies leaves its python backend stubs (hundreds of MB each) running otherwise.
With --shm-prefix, the files in /dev/shm whose names start with it are removed whenever the child has
ended: a killed tritonserver leaves its python backend's shared memory regions (and the robust mutexes
in them) behind. The prefix names one stack's regions only (es_ray/stack/triton.py, shm_prefix).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from es_ray.logs import get_logger

log = get_logger("es_ray.stack.supervisor")

SHM_DIR = Path("/dev/shm")

STABLE_S = 60.0   # a child that lived this long resets the back-off
MAX_BACKOFF_S = 30.0


def _set_when_done(wait: Callable[[], object], event: threading.Event, name: str) -> None:
    """Sets `event` once `wait()` returns, from a thread of its own: the supervisor sleeps until its child
    exits or it is told to stop, whichever comes first, instead of checking a few times a second."""
    threading.Thread(target=lambda: (wait(), event.set()), name=name, daemon=True).start()


def supervise(name: str, command: list[str], child_pid_file: Path, stop: threading.Event,
              shm_prefix: str = "") -> int:
    backoff, restarts = 1.0, 0
    wake = threading.Event()
    _set_when_done(stop.wait, wake, "stop-watch")
    while not stop.is_set():
        started = time.monotonic()
        child = subprocess.Popen(command, start_new_session=True)
        child_pid_file.write_text(str(child.pid))
        log.info("supervisor.started", name=name, pid=child.pid, restarts=restarts)
        _set_when_done(child.wait, wake, f"wait-{child.pid}")
        while child.poll() is None:
            wake.wait()
            wake.clear()
            if stop.is_set():
                child.terminate()
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
                kill_group(child.pid)
                remove_shm(shm_prefix)
                log.info("supervisor.stopped", name=name, pid=child.pid, code=child.returncode)
                child_pid_file.unlink(missing_ok=True)
                return 0
        lived = time.monotonic() - started
        kill_group(child.pid)
        removed = remove_shm(shm_prefix)
        if lived > STABLE_S:
            backoff = 1.0
        restarts += 1
        log.warning("supervisor.child_exited", name=name, pid=child.pid, code=child.returncode,
                    lived_s=round(lived, 1), restart_in_s=backoff, shm_removed=removed)
        stop.wait(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)
    return 0


def kill_group(pgid: int) -> None:
    """Kills what is left of the child's process group (its own children)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left


def remove_shm(prefix: str) -> int:
    """Removes /dev/shm/<prefix>*, once the processes that mapped them are gone; returns how many."""
    if not prefix or "/" in prefix:
        return 0
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--child-pid-file", type=Path, required=True)
    parser.add_argument("--shm-prefix", default="", help="remove /dev/shm/<prefix>* after the child ends")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to supervise")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return supervise(args.name, command, args.child_pid_file, stop, args.shm_prefix)


if __name__ == "__main__":
    sys.exit(main())
