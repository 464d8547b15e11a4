"""Improvement benchmark: simulated clicks on train queries, one improvement run, nDCG@10 before/after.

    python -m es_ray.bench.improve --data ../shared/data/scifact

Loads every document judged for a train or test query plus random others (--docs in all) into the
benchmark's own stack, simulates `sessions_per_query` search sessions per train query with the
position-based click model of configs/clicks.yaml (real `POST /v1/search` sessions and click events),
runs the improvement loop, and reports nDCG@10 on the train queries (target +0.10) and on the test
queries, which never produced a click (target: no worse than -0.005).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from es_ray.demo.users import ClickModel, simulate_sessions
from es_ray.bench.common import bench_stack, write_result
from es_ray.client import EsRayClient
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.stack import jobs
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection
from es_ray.train.evaluation import evaluate

STATE = Path("/tmp/esr-bench-improve")


def run_queries(url: str, queries: dict[str, str], clients: int = 2) -> dict[str, dict[str, float]]:
    """Top 100 of every query over HTTP, not recorded as sessions (the demo measures the same way)."""
    from es_ray.demo.loop import search_run

    return search_run(url, queries, "queries", clients=clients)[0]


def load_corpus(settings, manifest, data: Path, docs: int, judged: set[str]) -> int:
    corpus = list(read_corpus(data / "corpus.jsonl"))
    random.Random(5).shuffle(corpus)
    chosen = [i for i in corpus if i["id"] in judged]
    chosen += [i for i in corpus if i["id"] not in judged][:max(0, docs - len(chosen))]
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        collection = Collection(blue.collection, blue.dim)
        if collection.count(conn) >= len(chosen):
            return len(chosen)
    path = settings.state_path / "bench" / f"improve-{data.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in chosen))
    status, logs = jobs.submit_and_wait(manifest, f"python -m es_ray.data.upsert --input {path}", echo_logs=False)
    if status != "SUCCEEDED":
        raise SystemExit(f"upsert job {status}:\n{logs[-3000:]}")
    return len(chosen)


def reset_learning(manifest) -> None:
    """The benchmark stack is ours: start every run from the model's vectors and no sessions."""
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        Collection(blue.collection, blue.dim).undo_global(conn)
        conn.execute(f"TRUNCATE sessions CASCADE; TRUNCATE user_parts_{blue.collection}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=1200)
    parser.add_argument("--clients", type=int, default=3, help="concurrent simulated users")
    parser.add_argument("--state-dir", type=Path, default=STATE)
    args = parser.parse_args(argv)

    import os
    os.environ.setdefault("ES_RAY_IMPROVE__ENABLED", "false")  # the benchmark runs the passes itself
    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    queries = read_queries(data / "queries.jsonl")
    train_qrels = read_qrels(data / "qrels" / "train.tsv")
    test_qrels = read_qrels(data / "qrels" / "test.tsv")
    judged = {d for qrels in (train_qrels, test_qrels) for docs in qrels.values() for d in docs}
    docs = load_corpus(settings, manifest, data, args.docs, judged)
    reset_learning(manifest)
    train = {q: queries[q] for q in sorted(train_qrels) if q in queries}
    test = {q: queries[q] for q in sorted(test_qrels) if q in queries}

    before = {"train": evaluate(run_queries(manifest.serve_url, train), train_qrels),
              "test": evaluate(run_queries(manifest.serve_url, test), test_qrels)}

    started = time.monotonic()
    sessions, clicks = simulate_sessions(manifest.serve_url, train, train_qrels, ClickModel.load(), args.clients)
    simulate_s = time.monotonic() - started
    started = time.monotonic()
    with EsRayClient.for_stack(manifest) as admin:
        improvement = admin.run_improvement(settle_s=0)
    improve_s = time.monotonic() - started

    after = {"train": evaluate(run_queries(manifest.serve_url, train), train_qrels),
             "test": evaluate(run_queries(manifest.serve_url, test), test_qrels)}
    result = {
        "benchmark": "improve", "docs": docs, "sessions": sessions, "clicks": clicks,
        "train": {"before": {"ndcg@10": round(before["train"]["ndcg@10"], 4)},
                  "after": {"ndcg@10": round(after["train"]["ndcg@10"], 4)}, "queries": len(train)},
        "test": {"before": {"ndcg@10": round(before["test"]["ndcg@10"], 4)},
                 "after": {"ndcg@10": round(after["test"]["ndcg@10"], 4)}, "queries": len(test)},
        "click_model": ClickModel.load().__dict__, "adjuster": settings.improve.adjuster.model_dump(),
        "improvement": improvement, "simulate_s": round(simulate_s, 1), "improve_s": round(improve_s, 1),
    }
    out = write_result("improve", data.name, result, f"python -m es_ray.bench.improve --docs {args.docs}")
    print(json.dumps(result, indent=2), f"\nwritten to {out}")  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
