"""Where the machine's CPU goes during a phase of a benchmark, by kind of process.

A thread reads every process's CPU time every few seconds; a process that exits keeps its last reading,
so a Ray Data actor that ends with the phase still counts (less what it spent after its last reading).
Kinds are es_ray/stack/processes.py's names with versions and connections merged: one line for the
item encoders' stubs of every version, one for Postgres's backends.
"""

from __future__ import annotations

import os
import re
import threading
import time

import psutil

from es_ray.stack.processes import describe


def kind(process: psutil.Process) -> str:
    name = describe(process)[0]
    if name.startswith("postgres: ") and not name.startswith(("postgres: checkpointer", "postgres: walwriter")):
        return "postgres backends"
    if name.startswith("ray::"):  # a worker's title names the method it runs: ray::ServeController.listen_for_change
        return re.sub(r"\.[A-Za-z_]\w*$", "", name)
    return re.sub(r"_v\d+$", "", name)  # stub item_encoder_v7 -> stub item_encoder


class CpuWatch:
    """Reads the process table every `every_s` until closed; `mark(label)` takes a reading at once."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self.last: dict[int, tuple[str, float]] = {}
        self.marks: dict[str, tuple[float, dict[int, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._read()

    def _read(self) -> None:
        for process in psutil.process_iter():
            try:
                times = process.cpu_times()
                reading = (kind(process), times.user + times.system)
            except psutil.Error:
                continue
            with self._lock:
                self.last[process.pid] = reading

    def mark(self, label: str) -> None:
        self._read()
        with self._lock:
            self.marks[label] = (time.monotonic(), {pid: cpu for pid, (_, cpu) in self.last.items()})

    def between(self, first: str, second: str, top: int = 10) -> dict:
        """The machine's share (of every core over the window) each kind used between two marks, the
        `top` largest and the rest as "other"; "idle" is what no process used."""
        (t0, before), (t1, after) = self.marks[first], self.marks[second]
        with self._lock:
            names = {pid: name for pid, (name, _) in self.last.items()}
        used: dict[str, float] = {}
        for pid, cpu in after.items():
            used[names[pid]] = used.get(names[pid], 0.0) + cpu - before.get(pid, 0.0)
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        ranked = sorted(used.items(), key=lambda kv: -kv[1])
        shares = {name: round(seconds / capacity, 3) for name, seconds in ranked[:top]}
        shares["other"] = round(sum(seconds for _, seconds in ranked[top:]) / capacity, 3)
        shares["idle"] = round(max(0.0, 1 - sum(used.values()) / capacity), 3)
        return {"window_s": round(t1 - t0, 1), "machine_share": shares}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
