"""Reindex benchmark: items/s of a full reindex at growing sizes, against the raw model forward pass,
and search latency during the reindex against idle.

    python -m es_ray.bench.reindex --sizes 10000,50000,100000

Items are sentences of the SciFact and Cranfield abstracts (repeated with a suffix where a size needs
more). For each size the blue collection is grown to that many items by writing rows directly
(texts with placeholder vectors: the reindex reads only texts, and loading through the model would
double the run), a new model version is registered (v1 with weight noise), and `POST /v1/tasks/reindex`
re-embeds everything through Triton into a green collection and switches to it; meanwhile one client
searches. The raw forward pass (same texts, batch size and max_length; the fastest of three passes over
the first 1,000) is measured in the same run with nothing else running, after the first reindex: the
model file Triton serves for the version just reindexed (model.runtime's export: model.onnx in ONNX
Runtime on every core, bench/runtimes.served_forward), as the ingest benchmark does,
reindex.rows_per_request rows a forward as the reindex sends them; the issue's limit is the fastest
forward pass of the served model, not eager torch.
`raw_runtime` in the result says which it was (eager torch only if no served file is found).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from es_ray.bench.common import bench_stack, only_blue_live, percentiles, write_result
from es_ray.bench.cpu_use import CpuWatch
from es_ray.bench.ingest import raw_forward
from es_ray.bench.variants import register_variant
from es_ray.client import EsRayClient
from es_ray.config import Settings
from es_ray.data import beir
from es_ray.data.corpus import read_corpus
from es_ray.inference.triton_repo import ITEM_ENCODER, model_file, version_dir
from es_ray.serve.schemas import TaskOut
from es_ray.stack import triton
from es_ray.stack.manifest import StackManifest
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection, EmbeddedItem

STATE = Path("/tmp/esr-bench-reindex")
PROBES = ["protein folding in cells", "wing design at supersonic speed", "vaccine efficacy trial",
          "boundary layer transition", "gene expression in tumours", "heat transfer in nozzles"]


def sentences(data_dirs: list[Path], n: int) -> list[str]:
    out: list[str] = []
    for data in data_dirs:
        for doc in read_corpus(data / "corpus.jsonl"):
            out += [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc["text"]) if len(s.strip()) > 30]
    unique = len(out)
    texts = [out[i % unique] + (f" ({i // unique})" if i >= unique else "") for i in range(n)]
    return texts


def grow_blue(settings: Settings, dsn: str, texts: list[str], dim: int, batch: int = 2000) -> None:
    """Writes items bench-<i> for every text not yet stored, with random placeholder vectors, then builds
    blue's HNSW index as the stack builds one (postgres.hnsw_m, hnsw_ef_construction, maintenance_work_mem)."""
    with db.connect(dsn) as conn:
        blue = blue_green.get_blue(conn)
        collection = Collection(blue.collection, blue.dim)
        have = collection.count(conn)
        if have >= len(texts):
            return
        conn.execute(f"DROP INDEX IF EXISTS parts_{blue.collection}_hnsw")   # one index build after the load
        rng = np.random.default_rng(have)
        for start in tqdm(range(have, len(texts), batch), desc="grow blue", unit="batch"):
            chunk = texts[start:start + batch]
            vectors = rng.normal(size=(len(chunk), 1, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
            collection.upsert(conn, [EmbeddedItem(f"bench-{start + k:07d}", {"n": start + k}, vectors[k],
                                                  {"text_sha256": hashlib.sha256(t.encode()).hexdigest()}, t)
                                     for k, t in enumerate(chunk)])
        collection.create_index(conn, settings.postgres.hnsw_m, settings.postgres.hnsw_ef_construction,
                                work_mem=settings.postgres.maintenance_work_mem)


def search_latency(manifest: StackManifest, stop: threading.Event | None = None, n: int = 100,
                   think_s: float = 0.2):
    """Search latency, one search per `think_s`, with the API key: a probe of the service that runs for the
    whole reindex, at a pace the per-client rate limit would refuse an anonymous client."""
    samples, failures = [], 0
    with EsRayClient.for_stack(manifest, timeout=60) as client:
        k = 0
        while (stop is None and k < n) or (stop is not None and not stop.is_set()):
            request = client.search_request(PROBES[k % len(PROBES)], limit=10, session=False)
            started = time.perf_counter()  # the exchange alone, as an HTTP client sees it: no parsing
            response = client.send("POST", "/v1/search", request)
            samples.append(time.perf_counter() - started)
            failures += response.status_code != 200
            k += 1
            time.sleep(think_s)
    return samples, failures


def reindex(manifest: StackManifest, version: int, hnsw: str, watch: CpuWatch) -> dict:
    """Runs the reindex task; `watch` is marked "load" and "loaded" as its stage enters and leaves the
    load (read -> Triton -> COPY), within a poll's 3 s."""
    last = {"ranges_done": None}

    def show(task: TaskOut) -> None:  # a line per finished range
        loading = task.progress.get("stage") == "reindexing"
        if loading and "load" not in watch.marks:
            watch.mark("load")
        elif not loading and "load" in watch.marks and "loaded" not in watch.marks:
            watch.mark("loaded")
        if task.progress.get("ranges_done") != last["ranges_done"]:
            last["ranges_done"] = task.progress.get("ranges_done")
            print(json.dumps({"task": task.task_id, "status": task.status, **task.progress}), flush=True)  # noqa: T201

    with EsRayClient.for_stack(manifest) as client:
        submitted = client.start_reindex(version, switch="force", hnsw=hnsw)
        task = client.wait_for_task(submitted.task_id, timeout_s=12 * 3600, poll_s=3, on_update=show)
    if task.status != "done":
        raise SystemExit(f"reindex {task.task_id} {task.status}: {task.error}")
    return task.result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000,100000", help="comma-separated item counts, growing")
    parser.add_argument("--hnsw", default="after", choices=("after", "during"),
                        help="build the green HNSW index after the load, or maintain it during it")
    parser.add_argument("--raw-items", type=int, default=1000, help="texts each raw forward pass embeds")
    parser.add_argument("--raw-passes", type=int, default=3, help="raw passes over those texts (the fastest counts)")
    parser.add_argument("--state-dir", type=Path, default=STATE)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    settings, manifest = bench_stack(args.state_dir)
    data_dirs = [d for d in (beir.shared_dataset("scifact"), beir.shared_dataset("cranfield")) if d is not None]
    if not data_dirs:
        data_dirs = [beir.locate(None, settings.state_path)]
    texts = sentences(data_dirs, sizes[-1])
    with db.connect(manifest.postgres_dsn) as conn:
        v1 = blue_green.get_model(conn, 1)
        stored = Collection(blue_green.get_blue(conn).collection, v1.dim).count(conn)
    if stored > sizes[0]:   # a reindex embeds every blue item: the size would not be the one measured
        raise SystemExit(f"blue already holds {stored} items, more than the size {sizes[0]}: a reindex embeds all "
                         f"of them. Use sizes from {stored} up, or a fresh --state-dir")
    raw: dict = {}
    runs = []
    for size in sizes:
        grow_blue(settings, manifest.postgres_dsn, texts[:size], v1.dim)
        idle, idle_failures = search_latency(manifest)
        # A seed of its own on a reused stack too: the same seed twice makes the same item tower, whose
        # vectors the reindex would copy instead of embedding them.
        with db.connect(manifest.postgres_dsn) as conn:
            registered = len(blue_green.list_models(conn))
        version = register_variant(settings, seed=1000 * registered + size)
        stop = threading.Event()
        during: dict = {}
        client = threading.Thread(target=lambda: during.update(
            zip(("samples", "failures"), search_latency(manifest, stop))))
        client.start()
        watch = CpuWatch()
        result = reindex(manifest, version, args.hnsw, watch)
        watch.close()
        stop.set()
        client.join()
        only_blue_live(manifest)   # the previous blue goes: the next size (or the ingest run after) writes once
        if not raw:   # the version just reindexed is blue now: its served file stays in the repository
            served = model_file(version_dir(triton.model_repository(settings.state_path), ITEM_ENCODER, version))
            # rows per forward as the reindex sends them (reindex.rows_per_request): rows sorted by length in
            # groups of 16 pad far less than groups of 64, so 64 made the raw side slower than the pipeline
            # The fastest of --raw-passes passes over the same texts: a pass at two threads on two cores
            # slows down with anything else that runs meanwhile (a switch's cleanup, autovacuum after the
            # load), and passes measured 87-127 items/s on one stack within an hour (BENCHMARKS.md).
            passes = [raw_forward(texts[:args.raw_items], v1.source_dir, settings.reindex.batch_size,
                                  settings.reindex.rows_per_request, v1.max_length, settings.model.chunk_overlap,
                                  settings.model.max_chunks, served) for _ in range(args.raw_passes)]
            raw_s, chunks = min(passes)
            raw = {"per_s": args.raw_items / raw_s, "chunks": chunks, "version": version,
                   "passes": [round(args.raw_items / s, 2) for s, _ in passes],
                   "runtime": served.suffix.lstrip(".") if served else "eager torch"}
        raw_per_s = raw["per_s"]
        run = {"items": result["items"], "items_per_s": result["items_per_s"], "load_s": result["load_s"],
               "first_range_s": result.get("first_range_s"),
               "index_s": result["index_s"], "reindex_s": result["seconds"],
               "ms_per_1k_items": round(1000 * 1000 * result["seconds"] / result["items"], 1),
               "ratio_to_raw": round(result["items_per_s"] / raw_per_s, 3),
               "search_idle": percentiles(idle), "search_during": percentiles(during["samples"]),
               "search_failures": idle_failures + during["failures"], "version": version,
               "cpu_during_load": watch.between("load", "loaded", top=16) if "loaded" in watch.marks else None}
        print(json.dumps(run), flush=True)  # noqa: T201 - progress of the benchmark
        runs.append(run)
    out = {"benchmark": "reindex", "runs": runs, "raw_items_per_s": round(raw["per_s"], 2), "raw_chunks": raw["chunks"],
           "raw_passes_items_per_s": raw["passes"],
           "raw_runtime": raw["runtime"], "raw_model_version": raw["version"], "raw_threads": os.cpu_count(),
           "raw_rows_per_forward": settings.reindex.rows_per_request, "served_threads": settings.model.torch_threads,
           "served_instances": settings.triton.item_instances,
           "hnsw": args.hnsw, "workers": settings.reindex.workers, "batch_size": settings.reindex.batch_size,
           "range_items": settings.reindex.range_items, "max_length": v1.max_length,
           "note": "items are sentences of the SciFact + Cranfield abstracts; items_per_s is the load phase (read "
                   "-> Triton -> COPY), reindex_s adds the HNSW build, re-derived adjustments and the switch; one "
                   "search client (0.2 s think time) runs during the reindex; cpu_during_load: each kind of "
                   "process's share of the machine (every core) during the load"}
    path = write_result(f"reindex-{args.hnsw}", "+".join(d.name for d in data_dirs), out,
                        f"python -m es_ray.bench.reindex --sizes {args.sizes} --hnsw {args.hnsw}")
    print(json.dumps(out, indent=2), f"\nwritten to {path}")  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
