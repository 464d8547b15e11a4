"""Fine-tuning benchmark: simulated clicks on train queries, one fine-tune cycle each way, test quality.

    python -m es_ray.bench.finetune --data ../shared/data/scifact

Loads the collection (every document by default) into the benchmark's own stack, simulates
`sessions_per_query` search sessions per *train* query with the position-based click model of
configs/clicks.yaml (real `POST /v1/search` sessions and click events), then runs the fine-tune
task (`POST /v1/tasks/fine-tune`: a Ray job, Tune over Train, MLflow) twice: naive (every click one
example) and debiased (configs/finetune.yaml's default). Test queries never produced a click; they
are ranked exactly over the collection's item vectors with each model's query tower, before and
after, and scored with trec_eval: nDCG@10, MRR@10, Recall@100. Also reported: Tune's wall time
against the ideal (sum of trial times / concurrent trials).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from es_ray.bench.common import bench_stack, write_result
from es_ray.demo.users import ClickModel, simulate_sessions
from es_ray.bench.improve import load_corpus, reset_learning
from es_ray.client import EsRayClient
from es_ray.data import beir
from es_ray.data.corpus import read_qrels, read_queries
from es_ray.inference.encoder import load_encoder, load_tokenizer, query_tower_dir
from es_ray.serve.schemas import TaskOut
from es_ray.stack.manifest import StackManifest
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection
from es_ray.train.config import load_finetune_config
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.evaluation import evaluate
from es_ray.train.trainer import embed_queries

STATE = Path("/tmp/esr-bench-finetune")
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def test_quality(model_dir: Path, items: ItemVectors, queries: dict[str, str], qrels, max_length: int) -> dict:
    """Exact top-100 of every test query over the item vectors with the model's query tower."""
    tower = query_tower_dir(model_dir)
    qids = sorted(queries)
    with torch.no_grad():
        vectors = embed_queries(load_encoder(tower), load_tokenizer(tower), [queries[q] for q in qids], max_length,
                                "cpu").numpy()
    scores = evaluate(items.rank(vectors, qids, k=100), qrels)
    return {k: round(scores[k], 4) for k in METRICS}


def fine_tune(manifest: StackManifest, overrides: dict, timeout_s: float = 7200) -> dict:
    last = {"progress": None}

    def show(task: TaskOut) -> None:  # a line per change of progress
        if task.progress != last["progress"]:
            last["progress"] = task.progress
            print(json.dumps({"task": task.task_id, "status": task.status, **task.progress}), flush=True)  # noqa: T201

    with EsRayClient.for_stack(manifest) as client:
        submitted = client.start_fine_tune(overrides)
        try:
            task = client.wait_for_task(submitted.task_id, timeout_s=timeout_s, poll_s=5, on_update=show)
        except TimeoutError as err:
            raise SystemExit(str(err)) from None
    if task.status != "done":
        raise SystemExit(f"fine-tune {task.task_id} {task.status}: {task.error}")
    return task.result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=0, help="documents to load (0: the whole collection)")
    parser.add_argument("--clients", type=int, default=3, help="concurrent simulated users")
    parser.add_argument("--overrides", default="{}", help="JSON merged over configs/finetune.yaml for both runs")
    parser.add_argument("--state-dir", type=Path, default=STATE)
    args = parser.parse_args(argv)

    os.environ.setdefault("ES_RAY_IMPROVE__ENABLED", "false")  # clicks must not move vectors here
    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    queries = read_queries(data / "queries.jsonl")
    train_qrels, test_qrels = read_qrels(data / "qrels" / "train.tsv"), read_qrels(data / "qrels" / "test.tsv")
    judged = {d for qrels in (train_qrels, test_qrels) for docs in qrels.values() for d in docs}
    total_docs = sum(1 for line in open(data / "corpus.jsonl") if line.strip())
    docs = load_corpus(settings, manifest, data, args.docs or total_docs, judged)
    train = {q: queries[q] for q in sorted(train_qrels) if q in queries}
    test = {q: queries[q] for q in sorted(test_qrels) if q in queries}

    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        collection = Collection(blue.collection, blue.dim)
        items = ItemVectors.from_chunks(collection.chunk_vectors(conn, collection.sample_ids(conn, 10**9), model=True))
        stored = conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
    planned = len(train) * ClickModel.load().sessions_per_query
    if stored == planned:  # the same simulated users already searched: their sessions are reused
        sessions = stored
        with db.connect(manifest.postgres_dsn) as conn:
            clicks = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    else:
        reset_learning(manifest)
        sessions, clicks = simulate_sessions(manifest.serve_url, train, train_qrels, ClickModel.load(), args.clients)

    overrides = json.loads(args.overrides)
    max_length = load_finetune_config(overrides=overrides).model.max_query_length
    result = {"benchmark": "finetune", "docs": docs, "sessions": sessions, "clicks": clicks,
              "test_queries": len(test), "baseline": test_quality(Path(blue.source_dir), items, test, test_qrels,
                                                                   max_length)}
    print(json.dumps(result), flush=True)  # noqa: T201 - the benchmark's progress
    for name, debias in (("naive", {"enabled": False}), ("debiased", {})):
        run = fine_tune(manifest, {**overrides, "debias": {**overrides.get("debias", {}), **debias}})
        result[name] = test_quality(Path(run["model_dir"]), items, test, test_qrels, max_length)
        result[f"{name}_run"] = {
            "version": run["version"], "candidate": run["candidate"], "heldout": run["heldout"],
            "blue_heldout": run["blue_heldout"], "best_trial": run["best_trial"], "tune_wall_s": run["tune_wall_s"],
            "ideal_wall_s": run["ideal_wall_s"], "trials": run["trials"], "examples": run["data"]["examples"],
            "method": run["data"]["method"], "propensity_source": run["data"]["propensity_source"],
            "seconds": run["seconds"]}
        print(json.dumps({name: result[name]}), flush=True)  # noqa: T201
    debiased = result["debiased_run"]
    result.update({"trials": len(debiased["trials"]), "tune_wall_s": debiased["tune_wall_s"],
                   "ideal_wall_s": debiased["ideal_wall_s"],
                   "tune_overhead": round(debiased["tune_wall_s"] / max(debiased["ideal_wall_s"], 1e-9), 3)})
    command = f"python -m es_ray.bench.finetune --data {args.data or '../shared/data/' + data.name}"
    if overrides:
        command += f" --overrides '{json.dumps(overrides)}'"
    out = write_result("finetune", data.name, result, command)
    print(json.dumps({k: result[k] for k in ("baseline", "naive", "debiased", "tune_wall_s", "ideal_wall_s")}),
          f"\nwritten to {out}")  # noqa: T201


if __name__ == "__main__":
    main()
