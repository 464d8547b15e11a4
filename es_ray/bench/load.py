"""Load, faults, model deploys and an attacker: search at 8 concurrent clients with click and upsert traffic
beside it, then Postgres restarted, tritonserver killed and the Serve replica killed under that load;
then new model versions deployed and undeployed under load (bench/results/load-deploy.json); then an
attacker beside normal traffic (es_ray/bench/attack.py: bench/results/load-attack.json).

    python -m es_ray.bench.load [--seconds 180] [--clients 8] [--only faults|deploy|attack]  (loopback; `make load`)

Every request is recorded (status, seconds, Retry-After). Reported: requests tried and failed, latency,
the memory of every process of the stack at the start and the end of the steady phase and each one's
growth after the warm-up (`--warmup-seconds`, 300: the issue's 15-minute run is `--seconds 900`), and per fault:
refused (must be 503 with Retry-After, or no answer while the replica is gone), time to recover, and
clicks lost (acknowledged but not stored: must be 0; unacknowledged ones are sent again with the same
event id and must be stored exactly once). tests/test_faults.py runs the same faults with a lighter load.
The deploy phase: `--deploy-cycles` times, a copy of the blue model registered as a new version in MLflow
is deployed through the lifecycle driver (deploy_version: its own tritonserver starts beside the versions serving)
and undeployed again, while the search clients and an upsert client run. Counted: failed searches and
upserts (must be 0) and, in Triton's logs, the tritonserver processes that died (the supervisor's
child_exited events) and the python backend's lock_exception aborts (upstream server#8882).

Memory is read from /proc/PID/smaps every 30 s (0.2 s of CPU for the stack's 38 processes, 0.7 % of a
core; `sampler` in the result). The growth figure is each process's private pages outside shared
mappings ("own"), with its USS and RSS beside it. Not RSS: a Postgres backend's RSS counts every
shared-buffer page it has touched, which grows while the 6 GB cache warms though the backend's own memory
does not. Not USS alone either: the kernel calls a page private when one process alone maps it, whatever
the mapping, so shared memory only one process has touched is in its USS (the postmaster's 66-103 MB of
it, the checkpointer's pages in the 15-minute run; growth_after_warmup). A process forked from another (Ray's
dashboard modules from its forkserver, Postgres's from the postmaster) shares its parent's pages until one of
them writes to one; the copy is then the writer's own, new memory that the figure rightly counts (Ray's
NodeHead module: about 1 MB of them at 10 minutes of its life, idle or under load; BENCHMARKS.md).
Growth percentages are from kB: the MB are rounded to 0.1, which alone would make a 0.3 MB process 0 or 33 %.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil
import psycopg
import ray
from pydantic import BaseModel

from es_ray.bench.attack import attack_phase
from es_ray.bench.common import DEFAULT_STATE, bench_stack, percentiles, write_result
from es_ray.client import EsRayClient
from es_ray.inference import registry
from es_ray.lifecycle.handle import get_driver
from es_ray.serve import schemas
from es_ray.stack import postgres, processes, triton
from es_ray.stack.manifest import StackManifest
from es_ray.store import blue_green

QUERIES = ["protein folding", "immune response", "gene expression in cancer", "vitamin deficiency",
           "antibiotic resistance", "sleep and memory", "insulin signalling", "viral replication"]


def tagged(query: str, tag: str) -> str:
    """`query` with a tag no other request of the load carries. A replica keeps the vectors of recent query
    texts (serve.query_cache_entries): a load that repeated its texts would stop reaching Triton after the
    first few, and a fault of Triton's would reach no search."""
    return f"{query} {tag}"


@dataclass
class Outcome:
    status: int          # 0: no HTTP answer (connection refused or reset)
    seconds: float
    retry_after: str | None
    at: float            # time.monotonic() when sent


@dataclass
class Load:
    """Search, click and upsert clients against a stack until stopped; every answer recorded."""

    url: str
    search_clients: int = 2
    click_clients: int = 1
    upsert_clients: int = 0
    think_s: float = 0.0                                           # pause between a search client's requests
    # Every client sends it (upserts need it): the load measures the service, not a person, and without it
    # one of these clients from one address is over the per-client rate limits within seconds.
    api_key: str | None = None
    searches: list[Outcome] = field(default_factory=list)
    clicks: list[Outcome] = field(default_factory=list)
    upserts: list[Outcome] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)                        # event ids answered 200
    unacked: dict[str, tuple[str, str]] = field(default_factory=dict)   # event id -> (session, item)
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])      # tags this load's queries (tagged)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Load":
        host = urlparse(self.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"load is sent to loopback only, not {host}")
        targets = ([(self._search, n) for n in range(self.search_clients)]
                   + [(self._click, n) for n in range(self.click_clients)]
                   + [(self._upsert, n) for n in range(self.upsert_clients)])
        self.threads = [threading.Thread(target=fn, args=(n,), daemon=True) for fn, n in targets]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _request(self, client: EsRayClient, log: list[Outcome], method: str, path: str, request: BaseModel):
        started = time.monotonic()
        try:
            response = client.send(method, path, request)  # the raw answer: its status and Retry-After count
        except httpx.TransportError:
            log.append(Outcome(0, time.monotonic() - started, None, started))
            return None
        log.append(Outcome(response.status_code, time.monotonic() - started, response.headers.get("retry-after"),
                           started))
        return response

    def _search(self, n: int) -> None:
        with EsRayClient(self.url, api_key=self.api_key, timeout=60) as client:
            k = n
            while not self.stop.is_set():
                query = tagged(QUERIES[k % len(QUERIES)], f"{self.run}.s{n}.{k}")
                self._request(client, self.searches, "POST", "/v1/search",
                              client.search_request(query, limit=10, session=False))
                k += 1
                self.stop.wait(self.think_s)

    def _click(self, n: int) -> None:
        rng, k = random.Random(n), 0
        with EsRayClient(self.url, api_key=self.api_key, timeout=60) as client:
            while not self.stop.is_set():
                k += 1
                query = tagged(rng.choice(QUERIES), f"{self.run}.c{n}.{k}")
                shown = self._request(client, self.clicks, "POST", "/v1/search", client.search_request(query, limit=5))
                if shown is None or shown.status_code != 200 or not shown.json()["session_id"]:
                    self.stop.wait(0.1)
                    continue
                session, item = shown.json()["session_id"], rng.choice(shown.json()["results"])["id"]
                event_id = f"load-{uuid.uuid4().hex}"
                click = schemas.Event(event_id=event_id, item_id=item, type="click")
                answer = self._request(client, self.clicks, "POST", f"/v1/sessions/{session}/events",
                                       schemas.EventsRequest(events=[click]))
                if answer is not None and answer.status_code == 200 and answer.json()["accepted"] == 1:
                    self.acked.add(event_id)
                else:
                    self.unacked[event_id] = (session, item)
                self.stop.wait(0.05)

    def _upsert(self, n: int) -> None:
        """Rewrites a small rotating set of load-test items (ids load-<n>-<k>) with new text."""
        rng = random.Random(100 + n)
        with EsRayClient(self.url, api_key=self.api_key, timeout=60) as client:
            while not self.stop.is_set():
                ids = rng.sample(range(50), 4)
                items = [{"id": f"load-{n}-{k}", "text": f"{rng.choice(QUERIES)} note {rng.random():.6f}",
                          "payload": {"source": "load-test"}} for k in ids]
                self._request(client, self.upserts, "PUT", "/v1/items", schemas.UpsertRequest(items=items))
                self.stop.wait(0.5)

    def recovered(self, since: float, n: int = 5) -> bool:
        """The last n searches sent after `since` all answered 200."""
        recent = [o for o in list(self.searches) if o.at > since][-n:]
        return len(recent) == n and all(o.status == 200 for o in recent)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        report = {}
        for name, log in (("search", self.searches), ("click", self.clicks), ("upsert", self.upserts)):
            window = [o for o in list(log) if since <= o.at < until]
            ok = [o.seconds for o in window if o.status == 200]
            refused = [o.seconds for o in window if o.status != 200]
            report[name] = {"requests": len(window), "failed": len(refused),
                            "statuses": dict(Counter(str(o.status) for o in window)),
                            "latency": percentiles(ok) if ok else {},
                            "refused_latency": percentiles(refused) if refused else {}}
        return report


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until condition() held; AssertionError after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def stored_events(dsn: str, event_ids) -> Counter:
    """How many times each of these event ids is stored."""
    with psycopg.connect(dsn) as conn:
        return Counter(r[0] for r in conn.execute("SELECT event_id FROM events WHERE event_id = ANY(%s)",
                                                  (list(event_ids),)))


def settle_clicks(api: EsRayClient, dsn: str, load: Load) -> dict[str, int]:
    """After a fault: are all acknowledged clicks stored? Unacknowledged ones are sent again (what a
    client does), then every click must be stored exactly once. Returns the counts; lost must be 0."""
    stored = stored_events(dsn, load.acked)
    lost = sum(1 for event_id in load.acked if stored[event_id] != 1)
    resent = Counter()
    for event_id, (session, item) in load.unacked.items():
        resent.update(api.add_events(session, [{"event_id": event_id, "item_id": item, "type": "click"}]).model_dump())
    every = load.acked | set(load.unacked)
    stored = stored_events(dsn, every)
    return {"acknowledged": len(load.acked), "lost": lost, "resent": len(load.unacked),
            "resent_accepted": resent["accepted"], "resent_duplicates": resent["duplicates"],
            "not_stored_once": sum(1 for event_id in every if stored[event_id] != 1)}


def refusals(outcomes: list[Outcome], since: float) -> list[Outcome]:
    return [o for o in outcomes if o.at >= since and o.status != 200]


# --- the faults ----------------------------------------------------------------------------------------

def restart_postgres(load: Load, state_dir: Path, down_s: float = 3.0) -> dict:
    postgres.stop(state_dir)
    stopped = time.monotonic()
    wait_for(lambda: any(o.status == 503 and o.at > stopped for o in load.searches), 30, "503 while Postgres is down")
    time.sleep(down_s)
    postgres.start(state_dir)
    restarted = time.monotonic()
    recovery = wait_for(lambda: load.recovered(restarted), 60, "search after the Postgres restart")
    acked = len(load.acked)
    wait_for(lambda: len(load.acked) > acked + 2, 60, "clicks after the Postgres restart")
    return {"fault_at": stopped, "recovered_s_after_restart": round(recovery, 1)}


def serving_triton_pid(state_dir: Path) -> int | None:
    """The tritonserver that answers blue's searches: blue's own in the embedded stack (one per version)."""
    manifest = StackManifest.load(state_dir)
    with psycopg.connect(manifest.postgres_dsn, autocommit=True) as conn:
        blue = blue_green.get_blue(conn)
    return triton.server_pid(state_dir, None if manifest.triton_url else blue.model_version)


def kill_triton(load: Load, state_dir: Path) -> dict:
    before = serving_triton_pid(state_dir)
    if not before:
        raise AssertionError("tritonserver is not running")
    os.kill(before, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: any(o.status == 503 and o.at > killed for o in load.searches), 30, "503 while Triton is down")
    recovery = wait_for(lambda: load.recovered(killed + 1), 180, "search after the Triton restart")
    after = serving_triton_pid(state_dir)
    if not after or after == before:
        raise AssertionError("the supervisor did not start a new tritonserver")
    wait_for(lambda: not _group(before), 10, "the killed tritonserver's backend stubs gone")
    return {"fault_at": killed, "recovered_s_after_kill": round(recovery, 1), "pids": [before, after]}


def _group(pgid: int) -> list[int]:
    """Live processes of a process group."""
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def replica_pids(manifest: StackManifest) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(address=manifest.ray_dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if a.class_name.startswith("ServeReplica:") and a.class_name.endswith(":SearchAPI")]


def kill_replica(load: Load, manifest: StackManifest) -> dict:
    before = replica_pids(manifest)
    if len(before) != 1:
        raise AssertionError(f"expected one SearchAPI replica, found {before}")
    os.kill(before[0], signal.SIGKILL)
    killed = time.monotonic()
    recovery = wait_for(lambda: load.recovered(killed + 1) and len(replica_pids(manifest)) == 1, 180,
                        "a new replica answering")
    acked = len(load.acked)
    wait_for(lambda: len(load.acked) > acked + 2, 60, "clicks after the new replica")
    after = replica_pids(manifest)
    if not after or after[0] == before[0]:
        raise AssertionError("the replica was not replaced")
    return {"fault_at": killed, "recovered_s_after_kill": round(recovery, 1), "pids": [before[0], after[0]]}


# --- memory ---------------------------------------------------------------------------------------------

def stack_processes(state_dir: Path) -> dict[str, psutil.Process]:
    """Every process of this state dir's stack (es_ray/stack/processes.py), named by role and pid."""
    return {f"{processes.describe(p)[0][:48]} [{p.pid}]": p for p in processes.stack_processes(state_dir)}


MAPPING = re.compile(rb"^[0-9a-f]+-[0-9a-f]+ [r-][w-][x-]([sp]) ", re.MULTILINE)
PRIVATE = re.compile(rb"^Private_(?:Clean|Dirty|Hugetlb):\s+(\d+) kB", re.MULTILINE)


def private_kb(pid: int) -> tuple[int, int]:
    """(USS, the part of it in shared mappings) in kB, from /proc/PID/smaps. The kernel counts a page as
    private when one process alone maps it, whatever the mapping: a page of Postgres's shared buffers that
    only one backend has touched is in that backend's USS, as are pages of Triton's and Ray's shared
    memory one process alone has touched (psutil's USS is the first figure, from smaps_rollup)."""
    text = Path(f"/proc/{pid}/smaps").read_bytes()
    starts = [(m.start(), m.group(1) == b"s") for m in MAPPING.finditer(text)]
    total = in_shared = 0
    k = 0
    for match in PRIVATE.finditer(text):
        while k + 1 < len(starts) and starts[k + 1][0] < match.start():
            k += 1
        kb = int(match.group(1))
        total += kb
        in_shared += kb if starts and starts[k][1] else 0
    return total, in_shared


MEASURES = ("own", "uss", "rss")


def memory_mb(processes: dict[str, psutil.Process]) -> dict[str, dict[str, float | None]]:
    """Each process's memory (None for one gone): `own`, its private pages outside shared mappings (the
    growth figure), `uss` (all its private pages, shared mappings' included) and `rss`, in MB to read
    (0.1 MB) and in kB (`own_kb`, ...) for the growth: at 0.1 MB a 0.33 MB process that gains 10 kB would
    read 0.3 -> 0.4 MB, 33 %, where it grew 3 %."""
    sizes = {}
    for name, process in processes.items():
        try:
            uss, in_shared = private_kb(process.pid)
            kb = {"own": uss - in_shared, "uss": uss, "rss": process.memory_info().rss // 2**10}
            sizes[name] = {**{m: round(kb[m] / 2**10, 1) for m in MEASURES},
                           **{f"{m}_kb": kb[m] for m in MEASURES}}
        except (OSError, psutil.Error):
            sizes[name] = {**{m: None for m in MEASURES}, **{f"{m}_kb": None for m in MEASURES}}
    return sizes


def group_of(name: str) -> str:
    """The part of the stack a process belongs to, from its role name (stack_processes)."""
    if name.startswith("postgres"):
        return "postgres"
    if name.startswith(("tritonserver", "stub ", "es_ray.stack.supervisor")):
        return "triton"
    if name.startswith(("ray::LifecycleDriver", "ray::ServeReplica")):
        return "es-ray"
    if name.startswith(("ray", "gcs_server", "monitor.py", "dashboard.py", "agent.py", "log_monitor.py")):
        return "ray"   # Ray's own processes, Serve's controller and proxy included
    return "other"     # a child of a stack process es-ray does not name (processes.ROLES)


GROWTH_MEASURE = "own"   # the growth figure: private pages outside shared mappings (memory_mb)


def growth_after_warmup(warm: dict[str, dict], end: dict[str, dict], warmup_s: float) -> dict:
    """Each process's growth from the end of the warm-up to the end of the steady load, by each measure
    of memory_mb (largest first, and the largest per part of the stack; a process gone by the end, e.g. a
    replaced worker, is left out); GROWTH_MEASURE's is the growth figure.

    Why not RSS: a Postgres backend's RSS counts every page of the shared buffers it has touched, and with
    a 6 GB shared_buffers cache that grows for as long as the cache warms (17-35 % in the 15-minute run
    of af4566b) while the backend's own memory does not. USS alone does not separate them either: the
    kernel counts a shared-buffer page that one backend alone maps as that backend's private page. The
    private pages outside shared mappings are what a process holds for itself (heap, stacks, arenas)."""
    by_measure = {}
    for measure in MEASURES:
        # the percentages from kB, never from the rounded MB (memory_mb)
        before = {name: size[f"{measure}_kb"] for name, size in warm.items()}
        after = {name: size[f"{measure}_kb"] for name, size in end.items()}
        growth = {name: _pct(size, after[name]) for name, size in before.items() if size and after.get(name)}
        largest = sorted(growth.items(), key=lambda item: -item[1])
        groups: dict[str, tuple[str, float]] = {}
        for name, pct in largest:
            groups.setdefault(group_of(name), (name, pct))
        # a 2 MB backend that gains 1 MB grew 50 %: the megabytes beside the percentages (to 0.01 MB, so a
        # small process's few kB do not read 0.0)
        grown_mb = sorted(((name, round((after[name] - size) / 2**10, 2)) for name, size in before.items()
                           if size and after.get(name)), key=lambda item: -item[1])
        by_measure[measure] = {"largest_pct": dict(largest[:8]), "largest_mb": dict(grown_mb[:8]),
                               "max_pct": largest[0][1] if largest else None,
                               "max_process": largest[0][0] if largest else None,
                               "max_by_group": {group: {"process": name, "pct": pct}
                                                for group, (name, pct) in sorted(groups.items())}}
    headline = by_measure[GROWTH_MEASURE]
    return {"warmup_s": round(warmup_s), "growth_measure": GROWTH_MEASURE,
            "growth_after_warmup_pct": headline["largest_pct"], "max_growth_after_warmup_pct": headline["max_pct"],
            "max_growth_process": headline["max_process"], "growth_by_measure": by_measure}


def _pct(before: float, after: float) -> float:
    return round(100 * (after / before - 1), 1)


def growth_by_half(series: dict[str, list[tuple[float, int | None]]], warmup_s: float, top: int = 6) -> dict:
    """For the processes that grew most after the warm-up, their own memory's growth in % over the first and
    the second half of the time after it (from the series in kB, own_kb_every_30s): a leak grows about as
    much in both, a cache or an allocator arena that fills grows less in the second (or not at all)."""
    halves = {}
    for name, points in series.items():
        after = [(t, kb) for t, kb in points if t >= warmup_s and kb]
        if len(after) < 3:
            continue
        middle = after[0][0] + (after[-1][0] - after[0][0]) / 2
        mid = min(after, key=lambda point: abs(point[0] - middle))
        (_, start), (_, middle_kb), (_, end) = after[0], mid, after[-1]
        halves[name] = {"first": _pct(start, middle_kb), "second": _pct(middle_kb, end), "whole": _pct(start, end)}
    return dict(sorted(halves.items(), key=lambda item: -item[1]["whole"])[:top])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180, help="steady load before the faults")
    parser.add_argument("--clients", type=int, default=8, help="concurrent search clients")
    parser.add_argument("--warmup-seconds", type=float, default=300,
                        help="memory growth counts after this much of the steady load (at most a third of it)")
    parser.add_argument("--state-dir", default=DEFAULT_STATE)
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--only", choices=["faults", "deploy", "attack"], help="one phase (default: all)")
    parser.add_argument("--deploy-cycles", type=int, default=30, help="deploy + undeploy cycles of new versions")
    parser.add_argument("--attack-seconds", type=float, default=60, help="normal traffic alone, then this long again "
                                                                          "beside the attacker")
    parser.add_argument("--attack-rate", type=float, default=50, help="the attacker's requests per second")
    args = parser.parse_args(argv)

    settings, manifest = bench_stack(args.state_dir)
    api = EsRayClient.for_stack(manifest, timeout=120)
    if args.only in (None, "faults"):
        steady_and_faults(args, settings, manifest, api)
    if args.only in (None, "deploy"):
        result = deploy_phase(settings, manifest, api, args.deploy_cycles, args.clients)
        command = "python -m es_ray.bench.load --only deploy" + (
            f" --deploy-cycles {args.deploy_cycles}" if args.deploy_cycles != 30 else "")
        write_result("load", "deploy", {"benchmark": "load-deploy", **result}, command)
    if args.only in (None, "attack"):
        result = attack_phase(api, manifest.serve_url, args.attack_seconds, args.attack_rate, args.clients)
        command = "python -m es_ray.bench.load --only attack" + (
            f" --attack-seconds {args.attack_seconds:g}" if args.attack_seconds != 60 else "")
        write_result("load", "attack", {"benchmark": "load-attack", **result}, command)
    api.close()


# --- deploys under load ---------------------------------------------------------------------------------

ABORT_MARKERS = ("lock_exception", "Signal (6)", "Signal (11)")   # what an aborting tritonserver prints


def triton_log_sizes(state_dir: Path) -> dict[Path, int]:
    """Every Triton log of the stack (its server's and its supervisor's) and its size now."""
    return {path: path.stat().st_size for path in (state_dir / "triton").rglob("*.log")}


def triton_log_since(sizes: dict[Path, int], state_dir: Path) -> list[str]:
    """The lines written to the Triton logs after `sizes` was taken."""
    lines = []
    for path in sorted((state_dir / "triton").rglob("*.log")):
        with open(path, "rb") as log_file:
            log_file.seek(sizes.get(path, 0))
            lines += log_file.read().decode(errors="replace").splitlines()
    return lines


def copy_of_blue(settings, blue_version: int, cycle: int) -> int:
    """Registers blue's model files again as a new MLflow version (the same artifacts: nothing copied)."""
    client = registry.client(registry.tracking_uri(settings))
    blue = client.get_model_version(settings.mlflow.registered_model, str(blue_version))
    version = client.create_model_version(settings.mlflow.registered_model, source=blue.source, run_id=blue.run_id,
                                          description=f"load benchmark: deploy cycle {cycle}, a copy of v{blue_version}",
                                          tags={"es_ray.role": "load-deploy-copy"})
    return int(version.version)


def deploy_phase(settings, manifest: StackManifest, api: EsRayClient, cycles: int, clients: int) -> dict:
    """`cycles` deploys and undeploys of new versions through the lifecycle driver under search and upsert
    load; failed requests and Triton's deaths and aborts counted."""
    state = settings.state_path
    api.upsert_items([{"id": f"load-0-{k}", "text": f"{QUERIES[k % len(QUERIES)]} seed text",
                       "payload": {"source": "load-test"}} for k in range(50)])
    ray.init(address=manifest.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    driver = get_driver(settings.ray.namespace)
    blue = ray.get(driver.blue.remote())["model_version"]
    sizes = triton_log_sizes(state)
    timings, errors = [], []
    with Load(manifest.serve_url, search_clients=clients, click_clients=0, upsert_clients=1,
              api_key=api.api_key) as load:
        time.sleep(5)
        started = time.monotonic()
        for cycle in range(cycles):
            version = copy_of_blue(settings, blue, cycle)
            try:
                t0 = time.monotonic()
                ray.get(driver.deploy_version.remote(version))
                t1 = time.monotonic()
                ray.get(driver.undeploy_version.remote(version))
                timings.append({"version": version, "deploy_s": round(t1 - t0, 1),
                                "undeploy_s": round(time.monotonic() - t1, 1)})
            except Exception as err:  # noqa: BLE001 - a failed cycle is a finding: recorded, the next one tried
                errors.append({"version": version, "error": f"{type(err).__name__}: {err}"[:500]})
            print({"cycle": cycle, **(timings[-1] if timings and timings[-1]["version"] == version
                                      else errors[-1])}, flush=True)  # noqa: T201 - the phase's progress
        ended = time.monotonic()
        time.sleep(5)  # requests sent during the last undeploy finish
    ray.shutdown()
    window = load.summary(started, ended)
    lines = triton_log_since(sizes, state)
    exits = [line for line in lines if "supervisor.child_exited" in line]
    aborts = [line for line in lines if any(marker in line for marker in ABORT_MARKERS)]
    return {"deploy_cycles": len(timings), "deploy_cycles_failed": errors, "search_clients": clients,
            "seconds": round(ended - started, 1),
            "deploy_failed_searches": window["search"]["failed"], "deploy_failed_upserts": window["upsert"]["failed"],
            # a tritonserver that died is one the supervisor saw exit; its own last words say why
            "triton_aborts": len(exits), "triton_lock_exceptions": sum("lock_exception" in line for line in aborts),
            "triton_abort_lines": aborts[:20], "triton_exit_lines": exits[:20],
            "search": window["search"], "upsert": window["upsert"],
            "deploy_s": percentiles_s([t["deploy_s"] for t in timings]),
            "undeploy_s": percentiles_s([t["undeploy_s"] for t in timings]), "cycles": timings}


def percentiles_s(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 1), "max": round(max(values), 1)} if values else {}


def steady_and_faults(args, settings, manifest: StackManifest, api: EsRayClient) -> None:
    """The steady load (memory sampled every 30 s), then the faults under load."""
    state = settings.state_path
    warm = [{"id": f"load-0-{k}", "text": f"{QUERIES[k % len(QUERIES)]} seed text", "payload": {"source": "load-test"}}
            for k in range(50)]
    api.upsert_items(warm)

    processes = stack_processes(state)
    sampler_cpu: list[float] = []   # the sampler's own CPU seconds per sample: smaps_rollup is not free

    def sample() -> dict[str, dict]:
        cpu = time.process_time()
        sizes = memory_mb(processes)
        sampler_cpu.append(time.process_time() - cpu)
        return sizes

    def totals_of(sizes: dict[str, dict]) -> dict[str, float]:
        return {m: round(sum(v[m] for v in sizes.values() if v[m]), 1) for m in MEASURES}

    mem_start = sample()
    totals = [(0.0, totals_of(mem_start))]   # (seconds, the stack's MB by each measure) as it runs
    # each process's own kB at every sample: a growth that flattens (a cache or an arena filling) is told
    # from one that keeps its pace (a leak) only by its shape, which the start and end alone do not show
    own_series = {name: [(0.0, size["own_kb"])] for name, size in mem_start.items()}
    # Growth counts from the end of the warm-up (caches, pools and arenas fill in the first minutes): the
    # issue's bound is 5 % after the first 5 minutes of a 15-minute run; a shorter run uses its first third.
    warmup_s, mem_warm = min(args.warmup_seconds, args.seconds / 3), None
    with Load(manifest.serve_url, search_clients=args.clients, click_clients=1, upsert_clients=1,
              api_key=api.api_key) as load:
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.seconds:
            time.sleep(min(30.0, args.seconds - elapsed, max(warmup_s - elapsed, 0) or 30.0))
            sizes = sample()
            at = round(time.monotonic() - started)
            totals.append((at, totals_of(sizes)))
            for name, size in sizes.items():
                own_series.setdefault(name, []).append((at, size["own_kb"]))
            if mem_warm is None and time.monotonic() - started >= warmup_s:
                mem_warm = sizes
        steady_end = time.monotonic()
        mem_end = sample()
        steady = load.summary(started, steady_end)
        faults = {}
        if not args.no_faults:
            for name, fault in (("postgres_restart", lambda: restart_postgres(load, state)),
                                ("triton_kill", lambda: kill_triton(load, state)),
                                ("replica_kill", lambda: kill_replica(load, manifest))):
                result = fault()
                window = load.summary(result.pop("fault_at"), time.monotonic())
                faults[name] = {**result, "during": window}
                time.sleep(5)
    clicks = settle_clicks(api, manifest.postgres_dsn, load)
    command = "python -m es_ray.bench.load" + (" --only faults --no-faults" if args.no_faults else "") + (
        f" --seconds {args.seconds:g}" if args.seconds != 180 else "")
    # A steady run without faults (the 15-minute memory run) has a results file of its own beside the faults'.
    write_result("load", "steady" if args.no_faults else "synthetic", {
        "benchmark": "load", "seconds": args.seconds, "search_clients": args.clients, "steady": steady,
        "memory_mb": {"start": mem_start, "end": mem_end, "total_start": totals_of(mem_start),
                      "total_end": totals_of(mem_end), "total_every_30s": totals, "own_kb_every_30s": own_series},
        "sampler": {"processes": len(processes), "samples": len(sampler_cpu),
                    "cpu_ms_per_sample": round(1000 * float(np.mean(sampler_cpu)), 1)},
        **growth_after_warmup(mem_warm or mem_start, mem_end, warmup_s),
        "growth_by_half_pct": growth_by_half(own_series, warmup_s),
        "note": "memory_mb per process: own = private pages outside shared mappings (the growth figure), uss = "
                "all private pages (psutil's USS), rss; a shared-buffer page only one Postgres process maps is in "
                "its USS, and RSS counts every shared page it touched, so neither is the process's own memory; "
                "each also in kB (own_kb, ...): the growth percentages are from kB, the MB are rounded to 0.1",
        "faults": faults, "clicks": clicks}, command)


if __name__ == "__main__":
    main()
