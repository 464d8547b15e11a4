"""What the stack costs when nobody uses it: CPU share and memory of every process `es-ray up` started.

    python -m es_ray.bench.idle                              # the stack of .es-ray (after `make demo`)
    python -m es_ray.bench.idle --state-dir DIR              # a stack already running there, left running
    python -m es_ray.bench.idle --start --state-dir DIR      # starts one there, loads and searches a little,
                                                             # measures, stops it and checks nothing is left

The processes are found in the process table (es_ray/stack/processes.py: Ray's head, agents and workers,
Serve's controller, proxy and replicas, the lifecycle driver, PostgreSQL and its backends, Triton's
supervisor, server and stubs; MLflow is a sqlite file here, no process). Each is sampled every
--every-s seconds for --seconds: CPU is the sum of their user + system CPU time over the window divided by
the wall time (a process born inside the window counts from its start; one that ends counts to its last
sample). Memory is PSS (proportional set size: a page shared by n processes, torch's libraries for
example, counts 1/n in each), so the sum is what the stack takes from the machine; RSS is given beside
it (it counts shared pages in every process). Targets (issue 17): <= 10 % of one core, <= 3 GiB.
Per thread (Linux /proc): CPU and voluntary context switches, i.e. how often each thread wakes; the
busiest threads say which loop costs what (a Ray worker's main thread wakes 100 times a second, always).
Result: bench/results/idle-<machine>.json (`core_fraction`, `memory_gib`, the top processes).
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path
from typing import Any

import psutil

from es_ray.bench.common import write_result
from es_ray.logs import get_logger
from es_ray.stack.processes import describe, listening, listening_on, stack_ports, stack_processes

log = get_logger(__name__)


def _cpu_s(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.Error:
        return None


_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> dict[int, tuple[str, float, int]]:
    """Each thread of a process: its name, CPU seconds and voluntary context switches (its wakeups, nearly:
    a thread that sleeps and is woken switches out once per wakeup). Linux's /proc; psutil names no thread."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        wakeups = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) * _TICK_S, wakeups)
    return threads


def sample(state_dir: Path, seconds: float, every_s: float) -> dict[str, Any]:
    """CPU over the window and memory at its end, per process of the stack; CPU and wakeups per thread."""
    started = time.time()
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    seen: dict[int, psutil.Process] = {}
    first_threads: dict[tuple[int, int], tuple[str, float, int]] = {}
    last_threads: dict[tuple[int, int], tuple[str, float, int]] = {}
    deadline = time.monotonic() + seconds
    while True:
        known = set(seen)  # processes of earlier rounds: a thread new to one of them was born in the window
        for process in stack_processes(state_dir):
            cpu = _cpu_s(process)
            if cpu is None:
                continue
            if process.pid not in first:
                try:
                    born_inside = process.create_time() > started
                except psutil.Error:
                    continue
                first[process.pid] = 0.0 if born_inside else cpu
                seen[process.pid] = process
            last[process.pid] = cpu
            for tid, thread in _threads(process.pid).items():
                if (process.pid, tid) not in first_threads:  # one born inside the window counts from its start
                    new_here = first[process.pid] == 0.0 or process.pid in known
                    first_threads[(process.pid, tid)] = (thread[0], 0.0, 0) if new_here else thread
                last_threads[(process.pid, tid)] = thread
        if time.monotonic() >= deadline:
            break
        time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))
    wall = time.time() - started
    rows = []
    for pid, process in seen.items():
        name, role = describe(process)
        row = {"pid": pid, "name": name, "does": role, "cpu_s": round(last[pid] - first[pid], 3),
               "core_fraction": round((last[pid] - first[pid]) / wall, 4)}
        try:
            memory = process.memory_full_info()
            row.update(pss_mib=round(memory.pss / 2**20, 1), rss_mib=round(memory.rss / 2**20, 1),
                       uss_mib=round(memory.uss / 2**20, 1))
        except psutil.Error:
            row.update(pss_mib=None, rss_mib=None, uss_mib=None)  # ended before the end of the window
        rows.append(row)
    rows.sort(key=lambda r: r["cpu_s"], reverse=True)
    pss = sum(r["pss_mib"] or 0 for r in rows)
    names = {row["pid"]: row["name"] for row in rows}
    threads = [{"process": names[pid], "pid": pid, "thread": name,
                "core_fraction": round((cpu - first_threads[pid, tid][1]) / wall, 4),
                "wakeups_per_s": round((wakeups - first_threads[pid, tid][2]) / wall, 1)}
               for (pid, tid), (name, cpu, wakeups) in last_threads.items()]
    return {"seconds": round(wall, 1), "processes": len(rows),
            "core_fraction": round(sum(r["cpu_s"] for r in rows) / wall, 4),
            "memory_gib": round(pss / 1024, 3), "memory_kind": "PSS",
            "rss_gib": round(sum(r["rss_mib"] or 0 for r in rows) / 1024, 3),
            "top_cpu": rows[:5], "top_memory": sorted(rows, key=lambda r: -(r["pss_mib"] or 0))[:5],
            "by_role": _by_role(rows), "all": rows,
            # CPU is counted in clock ticks (10 ms): a thread's figure is good to about 0.0002 of a core here
            "top_threads": sorted(threads, key=lambda t: -t["core_fraction"])[:15]}


def _by_role(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """CPU and PSS summed by what the processes do (40 Postgres backends are one line)."""
    roles: dict[str, dict[str, float]] = {}
    for row in rows:
        entry = roles.setdefault(row["does"], {"processes": 0, "core_fraction": 0.0, "pss_mib": 0.0})
        entry["processes"] += 1
        entry["core_fraction"] = round(entry["core_fraction"] + row["core_fraction"], 4)
        entry["pss_mib"] = round(entry["pss_mib"] + (row["pss_mib"] or 0), 1)
    return dict(sorted(roles.items(), key=lambda kv: -kv[1]["core_fraction"]))


def light_use(state_dir: Path, docs: int, searches: int) -> dict[str, Any]:
    """A small collection and a few searches, so the stack is warm (pools open, models used) as after use."""
    from es_ray.client import EsRayClient
    from es_ray.data import beir
    from es_ray.stack.manifest import StackManifest

    manifest = StackManifest.load(state_dir)
    data = beir.shared_dataset("scifact") or Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "collection"
    items, queries, _ = beir.sample(data, docs=docs, queries=max(1, searches), seed=3)
    with EsRayClient.for_stack(manifest, timeout=300) as client:
        for start in range(0, len(items), 50):
            client.upsert_items(items[start:start + 50])
        texts = list(queries.values())
        for n in range(searches):
            client.search(texts[n % len(texts)])
    return {"docs": len(items), "searches": searches, "data": data.name}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=".es-ray")
    parser.add_argument("--start", action="store_true", help="start a stack in --state-dir first and stop it after")
    parser.add_argument("--docs", type=int, default=200, help="with --start: documents loaded first")
    parser.add_argument("--searches", type=int, default=20, help="with --start: searches before the idle window")
    parser.add_argument("--settle-s", type=float, default=30, help="wait this long before the window")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--every-s", type=float, default=5)
    parser.add_argument("--scratch", default="", help="an experiment's name: the result goes to /tmp, not bench/results")
    args = parser.parse_args(argv)
    state = Path(args.state_dir).expanduser().resolve()

    setup: dict[str, Any] = {"stack": "running stack measured as found"}
    if args.start:
        from es_ray.bench.common import bench_stack

        bench_stack(state)
        setup = {"stack": "started by the benchmark", **light_use(state, args.docs, args.searches)}
    elif not stack_processes(state):
        raise SystemExit(f"no process of a stack of {state} runs: `es-ray up --state-dir {state}` (or --start)")
    time.sleep(args.settle_s)
    from es_ray.config import load_settings

    result = {"benchmark": "idle", "state_dir": str(state), "settle_s": args.settle_s, **setup,
              "ray_env": load_settings(state).ray.env,  # what `es-ray up` gave `ray start` (configs/stack.yaml)
              **sample(state, args.seconds, args.every_s)}
    result["listening"] = listening([p for p in stack_processes(state)])
    if args.start:
        from es_ray.stack import control

        ports = stack_ports(state)
        control.down(load_settings(state))
        time.sleep(2)
        left = stack_processes(state)
        result["after_down"] = {"processes": [{"pid": p.pid, "name": describe(p)[0]} for p in left],
                                "listening": listening_on(ports)}
    command = "python -m es_ray.bench.idle" + (" --start" if args.start else "")
    path = write_result("idle", f"{os.cpu_count()}cores", result, command, args.scratch)
    print(f"{path}: {result['core_fraction']:.3f} of a core, {result['memory_gib']:.2f} GiB PSS "
          f"({result['rss_gib']:.2f} GiB RSS), {result['processes']} processes")
    for row in result["top_cpu"]:
        print(f"  {row['core_fraction']:.4f} core  {row['pss_mib']} MiB PSS  {row['name']}: {row['does']}")
    print("busiest threads:")
    for row in result["top_threads"][:8]:
        print(f"  {row['core_fraction']:.4f} core  {row['wakeups_per_s']:6.1f} wakeups/s  {row['process']}: {row['thread']}")


if __name__ == "__main__":
    main()
