"""Serving before batch work: search latency while a fine-tune runs, with and without its lower priority.

    python -m es_ray.bench.priority [--clients 2] [--rounds 1] [--docs 400]     (loopback)

SciFact documents are loaded into the benchmark stack; `clients` search clients (no pause, no clicks) run
throughout. In each of three settings they run alone (`baseline_s`), then beside `rounds` fine-tunes:
- `ray_default`: every Ray worker at Ray's own default niceness, 15 (Serve proxy and replica included:
  es-ray before serving came first), batch work not lowered further;
- `all_at_0`: Ray workers at 0 (es_ray/stack/ray_head.py), batch work at 0 too;
- `serving_first`: Ray workers at 0, batch work at `ray.batch_nice` (configs/stack.yaml): es-ray now.
The stack is restarted between the first and the others (Ray reads a worker's niceness when it starts
it). A fine-tune here is es-ray's own (es_ray/train/finetune.py: Ray Tune over Ray Train trials,
MLflow) on synthetic position-biased sessions over SciFact test queries, started from a Ray task that lowers itself first as a task job does
(es_ray/lifecycle/task_job.py); a real fine-tune job would need simulated users to click through the
API for a long time first. Reported per window: search p50/p99, requests, failures, the fine-tune's
wall time, and the nice values its Ray Train workers, the Serve replica and proxy were seen at; the
ratios compare the windows of one run.
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

from es_ray.bench.common import DEFAULT_STATE, bench_stack, write_result
from es_ray.bench.load import Load
from es_ray.client import EsRayClient
from es_ray.config import Settings, load_settings
from es_ray.data import beir
from es_ray.stack import control, ray_head
from es_ray.stack.credentials import local_api_key
from es_ray.store import blue_green, db
from es_ray.store.clickstream import LoggedSession
from es_ray.store.collections import Collection
from es_ray.train.clicklog import SessionBatch
from es_ray.train.config import load_finetune_config
from es_ray.train.finetune import ParentModel
from es_ray.train.item_vectors import ItemVectors

# Small but real: two trials at once on one CPU each, as configs/finetune.yaml runs them (~2 minutes on 2 cores).
FINETUNE = {"data": {"min_heldout_queries": 5}, "debias": {"propensity": "config"},
            "train": {"max_steps": 40, "eval_every_steps": 20},
            "tune": {"num_samples": 2, "max_concurrent_trials": 2, "grace_period": 1}}


def synthetic_sessions(queries: dict[str, str], qrels: dict[str, dict[str, int]], loaded: list[str],
                       per_query: int = 3, seed: int = 5) -> SessionBatch:
    """Per query, `per_query` result lists of ten: a relevant document among nine others, clicked with a
    position-biased probability (a relevant one 0.9 / rank, another 0.1 / rank)."""
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    sessions = []
    for qid, text in sorted(queries.items()):
        relevant = [d for d, g in qrels[qid].items() if g > 0 and d in set(loaded)]
        for n in range(per_query if relevant else 0):
            shown = [rng.choice(relevant)] + rng.sample([d for d in loaded if d not in relevant], 9)
            rng.shuffle(shown)
            clicked = {d for r, d in enumerate(shown) if rng.random() < (0.9 if d in relevant else 0.1) / (r + 1)}
            sessions.append(LoggedSession(f"{qid}-{n}", text, False, start + timedelta(seconds=len(sessions)),
                                          [(r + 1, d) for r, d in enumerate(shown)], clicked))
    return SessionBatch(sessions)


def _fine_tune_as_batch(settings: dict, nice: int, dsn: str, overrides: dict, batch, items, texts, parent) -> dict:
    """A fine-tune in a Ray worker of its own, lowered to `nice` first as a task job lowers itself, holding
    Ray's helper actors as the fine-tune job does (es_ray/data/ray_data_actors.py)."""
    from es_ray.data import ray_data_actors
    from es_ray.priority import run_as_batch
    from es_ray.train.finetune import fine_tune

    settings = Settings.model_validate({**settings, "ray": {**settings["ray"], "batch_nice": nice}})
    run_as_batch(nice)
    (settings.state_path / "mlflow").mkdir(parents=True, exist_ok=True)  # its sqlite store's folder
    started = time.monotonic()
    with ray_data_actors.in_use(dsn):
        result = fine_tune(settings, load_finetune_config(overrides=overrides), batch, items, texts, parent)
    return {"seconds": round(time.monotonic() - started, 1), "trials": len(result["trials"])}


ROLES = {"train_worker": "ray::RayTrainWorker", "replica": "ray::ServeReplica", "proxy": "ray::ProxyActor"}


class NiceSeen:
    """The nice values of this stack's Ray Train workers, Serve replicas and proxy (by process title),
    sampled every 0.5 s while it runs."""

    def __init__(self, state_dir: Path):
        self.marker, self.seen = str(ray_head.temp_dir(state_dir)), {role: set() for role in ROLES}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            for process in psutil.process_iter(["cmdline", "environ"]):
                try:
                    title = (process.info["cmdline"] or [""])[0]
                    if (process.info["environ"] or {}).get("RAY_TMPDIR") != self.marker:
                        continue
                    for role, prefix in ROLES.items():
                        if title.startswith(prefix):
                            self.seen[role].add(process.nice())
                except psutil.Error:
                    continue

    def __enter__(self) -> "NiceSeen":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def report(self) -> dict[str, list[int]]:
        return {role: sorted(values) for role, values in self.seen.items()}


def window(load: Load, since: float, until: float) -> dict:
    search = load.summary(since, until)["search"]
    return {"requests": search["requests"], "failed": search["failed"], "statuses": search["statuses"],
            **search["latency"]}


SETTINGS = {  # name: (RAY_worker_niceness, the fine-tune's niceness; None: ray.batch_nice)
    "ray_default": ("15", 0), "all_at_0": ("0", 0), "serving_first": ("0", None)}


def measure(args, name: str, batch_nice: int, prepared: dict) -> dict:
    """Searches alone, then beside `args.rounds` fine-tunes lowered to `batch_nice`, on the running stack."""
    import ray

    settings, manifest = prepared["settings"], prepared["manifest"]
    api_key = local_api_key(manifest.state_dir)
    ray.init(address=manifest.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    job = ray.remote(num_cpus=0, max_calls=1)(_fine_tune_as_batch)  # max_calls=1: its worker ends with it
    out = {"batch_nice": batch_nice, "runs": []}
    with Load(manifest.serve_url, search_clients=args.clients, click_clients=0, api_key=api_key) as load:
        with NiceSeen(Path(manifest.state_dir)) as seen:
            started = time.monotonic()
            time.sleep(args.baseline_s)
            out["baseline"] = window(load, started + 5, time.monotonic())  # the first seconds warm up
            out["baseline_nice_seen"] = seen.report()
        for _ in range(args.rounds):
            with NiceSeen(Path(manifest.state_dir)) as seen:
                since = time.monotonic()
                run = ray.get(job.remote(prepared["scratch"], batch_nice, manifest.postgres_dsn, FINETUNE,
                                        *prepared["finetune_args"]))
                until = time.monotonic()
            out["runs"].append({**run, "nice_seen": seen.report(), "search": window(load, since, until)})
            print(name, out["runs"][-1], flush=True)  # noqa: T201 - the benchmark's progress
    ray.shutdown()
    for key in ("p50_ms", "p99_ms"):
        out[key] = round(sum(r["search"][key] for r in out["runs"]) / len(out["runs"]), 2)
    out["p99_to_alone"] = round(out["p99_ms"] / out["baseline"]["p99_ms"], 2)
    return out


def prepare(args) -> dict:
    """The stack (started with this process's environment), SciFact documents loaded, the fine-tune's inputs."""
    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    docs, queries, qrels = beir.sample(data, args.docs, args.queries)
    with EsRayClient.for_stack(manifest, timeout=300) as api:
        api.upsert_items(docs)   # the same ids again after a restart: replaced, not added
    batch = synthetic_sessions(queries, qrels, [d["id"] for d in docs])
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        collection = Collection(blue.collection, blue.dim)
        items = ItemVectors.from_chunks(collection.chunk_vectors(conn, [d["id"] for d in docs], model=True))
    parent = ParentModel(blue.model_version, Path(blue.source_dir), blue.dim, blue.max_length)
    # the fine-tunes' MLflow store and Tune results go to a folder of their own, not the stack's registry
    scratch = settings.model_copy(update={"state_dir": settings.state_path / "priority-bench"})
    return {"settings": settings, "manifest": manifest, "data": data.name, "docs": len(docs),
            "sessions": len(batch.sessions), "scratch": scratch.model_dump(mode="json"),
            "finetune_args": (batch, items, {d["id"]: d["text"] for d in docs}, parent)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=150, help="test queries the synthetic sessions are about")
    parser.add_argument("--clients", type=int, default=2, help="concurrent search clients")
    parser.add_argument("--rounds", type=int, default=1, help="fine-tunes in each setting")
    parser.add_argument("--baseline-s", type=float, default=20, help="searches alone in each setting")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    result = {"benchmark": "priority", "search_clients": args.clients, "finetune_overrides": FINETUNE}
    worker_nice = None
    for name, (ray_nice, batch_nice) in SETTINGS.items():
        if ray_nice != worker_nice:  # Ray sets a worker's niceness as it starts it: a new stack
            control.down(load_settings(args.state_dir))
            os.environ["RAY_worker_niceness"] = worker_nice = ray_nice
            prepared = prepare(args)
            result.update({k: prepared[k] for k in ("docs", "sessions")})
        batch_nice = prepared["settings"].ray.batch_nice if batch_nice is None else batch_nice
        result[name] = {"ray_worker_niceness": int(ray_nice), **measure(args, name, batch_nice, prepared)}
    os.environ.pop("RAY_worker_niceness")
    result["batch_nice"] = result["serving_first"]["batch_nice"]
    for name in SETTINGS:
        result[f"p99_ms_{name}"] = result[name]["p99_ms"]
    # the change as measured in this run: es-ray now against es-ray before, and against the same stack unlowered
    result["p99_serving_first_to_ray_default"] = round(result["serving_first"]["p99_ms"]
                                                       / result["ray_default"]["p99_ms"], 2)
    result["p99_serving_first_to_all_at_0"] = round(result["serving_first"]["p99_ms"]
                                                    / result["all_at_0"]["p99_ms"], 2)
    command = f"python -m es_ray.bench.priority --clients {args.clients} --rounds {args.rounds}"
    print(write_result("priority", prepared["data"], result, command))  # noqa: T201


if __name__ == "__main__":
    main()
