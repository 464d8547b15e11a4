"""Serving before batch work: search latency while a fine-tune runs, with and without its lower priority.

    python -m es_ray.bench.priority [--clients 2] [--rounds 2] [--docs 400]     (loopback)

SciFact documents are loaded into the benchmark stack; `clients` search clients (no pause, no clicks) run
throughout. First they run alone (`baseline_s`), then beside fine-tunes, alternately at niceness 0 and
at `ray.batch_nice` (configs/stack.yaml), `rounds` of each. A fine-tune here is es-ray's own
(es_ray/train/finetune.py: Ray Tune over Ray Train trials, MLflow) on synthetic position-biased sessions
over SciFact test queries, started from a Ray task that lowers itself first as a task job does
(es_ray/lifecycle/task_job.py); a real fine-tune job would need simulated users to click through the
API for a long time first. Reported per window: search p50/p99, requests, failures, the fine-tune's
wall time, and the nice value its Ray Train workers were seen at; the ratios compare the windows of
one run.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

from es_ray.bench.common import DEFAULT_STATE, bench_stack, write_result
from es_ray.bench.load import Load
from es_ray.client import EsRayClient
from es_ray.config import Settings
from es_ray.data import beir
from es_ray.stack import ray_head
from es_ray.store import blue_green, db
from es_ray.store.clickstream import LoggedSession
from es_ray.store.collections import Collection
from es_ray.train.clicklog import SessionBatch
from es_ray.train.config import load_finetune_config
from es_ray.train.finetune import ParentModel
from es_ray.train.item_vectors import ItemVectors

# Small but real: two trials at once on one CPU each, as configs/finetune.yaml runs them, for ~a minute.
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


def _fine_tune_as_batch(settings: dict, nice: int, overrides: dict, batch, items, texts, parent) -> dict:
    """A fine-tune in a Ray worker of its own, lowered to `nice` first as a task job lowers itself."""
    from es_ray.priority import run_as_batch
    from es_ray.train.finetune import fine_tune

    settings = Settings.model_validate({**settings, "ray": {**settings["ray"], "batch_nice": nice}})
    run_as_batch(nice)
    (settings.state_path / "mlflow").mkdir(parents=True, exist_ok=True)  # its sqlite store's folder
    started = time.monotonic()
    result = fine_tune(settings, load_finetune_config(overrides=overrides), batch, items, texts, parent)
    return {"seconds": round(time.monotonic() - started, 1), "trials": len(result["trials"])}


class TrainWorkerNice:
    """The nice values of this stack's Ray Train worker processes, sampled every 0.5 s while it runs."""

    def __init__(self, state_dir: Path):
        self.marker, self.seen = str(ray_head.temp_dir(state_dir)), set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            for process in psutil.process_iter(["cmdline", "environ"]):
                try:
                    if ((process.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
                            and (process.info["environ"] or {}).get("RAY_TMPDIR") == self.marker):
                        self.seen.add(process.nice())
                except psutil.Error:
                    continue

    def __enter__(self) -> "TrainWorkerNice":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def window(load: Load, since: float, until: float) -> dict:
    search = load.summary(since, until)["search"]
    return {"requests": search["requests"], "failed": search["failed"], "statuses": search["statuses"],
            **search["latency"]}


def main(argv: list[str] | None = None) -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--queries", type=int, default=150, help="test queries the synthetic sessions are about")
    parser.add_argument("--clients", type=int, default=2, help="concurrent search clients")
    parser.add_argument("--rounds", type=int, default=2, help="fine-tunes at each niceness, alternating")
    parser.add_argument("--baseline-s", type=float, default=30, help="searches alone before the fine-tunes")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    docs, queries, qrels = beir.sample(data, args.docs, args.queries)
    api = EsRayClient.for_stack(manifest, timeout=300)
    api.upsert_items(docs)
    batch = synthetic_sessions(queries, qrels, [d["id"] for d in docs])
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        collection = Collection(blue.collection, blue.dim)
        items = ItemVectors.from_chunks(collection.chunk_vectors(conn, [d["id"] for d in docs], model=True))
    texts = {d["id"]: d["text"] for d in docs}
    parent = ParentModel(blue.model_version, Path(blue.source_dir), blue.dim, blue.max_length)
    # the fine-tunes' MLflow store and Tune results go to a folder of their own, not the stack's registry
    scratch = settings.model_copy(update={"state_dir": settings.state_path / "priority-bench"})

    ray.init(address=manifest.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    job = ray.remote(num_cpus=0, max_calls=1)(_fine_tune_as_batch)  # max_calls=1: its worker ends with it
    nice = settings.ray.batch_nice
    result = {"benchmark": "priority", "docs": len(docs), "sessions": len(batch.sessions),
              "search_clients": args.clients, "batch_nice": nice, "finetune_overrides": FINETUNE, "runs": []}
    with Load(manifest.serve_url, search_clients=args.clients, click_clients=0, api_key=api.api_key) as load:
        started = time.monotonic()
        time.sleep(args.baseline_s)
        result["baseline"] = window(load, started + 5, time.monotonic())  # the first seconds warm up
        for level in [0, nice] * args.rounds:
            with TrainWorkerNice(Path(manifest.state_dir)) as workers:
                since = time.monotonic()
                run = ray.get(job.remote(scratch.model_dump(mode="json"), level, FINETUNE, batch, items, texts,
                                         parent))
                until = time.monotonic()
            result["runs"].append({"nice": level, "worker_nice_seen": sorted(workers.seen), **run,
                                   "search": window(load, since, until)})
            print(result["runs"][-1], flush=True)  # noqa: T201 - the benchmark's progress
    ray.shutdown()
    api.close()

    def pooled(level: int, key: str) -> float:
        values = [r["search"][key] for r in result["runs"] if r["nice"] == level]
        return round(sum(values) / len(values), 2)

    for key in ("p50_ms", "p99_ms"):
        result[f"{key}_nice_0"], result[f"{key}_nice_{nice}"] = pooled(0, key), pooled(nice, key)
        result[f"{key}_baseline"] = result["baseline"][key]
    # how much a fine-tune slows search down, at niceness 0 and at batch_nice (1.0: not at all)
    result["p99_ratio_nice_0"] = round(result["p99_ms_nice_0"] / result["p99_ms_baseline"], 2)
    result[f"p99_ratio_nice_{nice}"] = round(result[f"p99_ms_nice_{nice}"] / result["p99_ms_baseline"], 2)
    result["p99_nice_to_not"] = round(result[f"p99_ms_nice_{nice}"] / result["p99_ms_nice_0"], 2)
    command = f"python -m es_ray.bench.priority --clients {args.clients} --rounds {args.rounds}"
    print(write_result("priority", data.name, result, command))  # noqa: T201


if __name__ == "__main__":
    main()
