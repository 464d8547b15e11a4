"""`es-ray demo`: load a BEIR sample through the bulk upsert job, search its test queries over HTTP,
and print retrieval quality. Leaves the stack running."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from es_ray.config import Settings
from es_ray.data import beir
from es_ray.stack import control, jobs
from es_ray.train.metrics import evaluate

console = Console()


def search_all(url: str, queries: dict[str, str], limit: int = 100) -> dict[str, dict[str, float]]:
    run: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=url, timeout=60) as client:
        for qid, text in tqdm(queries.items(), desc="search", unit="query"):
            response = client.post("/v1/search", json={"query": text, "limit": limit})
            response.raise_for_status()
            run[qid] = {r["id"]: r["score"] for r in response.json()["results"]}
    return run


def run(settings: Settings, data: Path | None, docs: int, queries: int) -> dict[str, float]:
    data_dir = beir.locate(data, settings.state_path)
    manifest = control.up(settings)
    items, query_texts, qrels = beir.sample(data_dir, docs, queries)
    sample_path = settings.state_path / "demo" / f"{data_dir.name}-sample.jsonl"
    sample_path.parent.mkdir(parents=True, exist_ok=True)
    sample_path.write_text("".join(json.dumps(i) + "\n" for i in items))
    console.print(f"[bold]Loading {len(items)} documents of {data_dir} as a Ray job[/bold]")
    started = time.monotonic()
    status, _ = jobs.submit_and_wait(manifest, f"python -m es_ray.data.upsert --input {sample_path}")
    if status != "SUCCEEDED":
        raise SystemExit(f"the upsert job ended {status}; see its logs above")
    load_s = time.monotonic() - started
    scores = evaluate(search_all(manifest.serve_url, query_texts, limit=min(100, settings.serve.max_limit)), qrels)

    table = Table(title=f"{data_dir.name}: {scores['queries']} test queries over {len(items)} documents")
    for column in ("nDCG@10", "MRR@10", "Recall@10", "Recall@100", "load s"):
        table.add_column(column, justify="right")
    table.add_row(*(f"{scores[k]:.3f}" for k in ("ndcg@10", "mrr@10", "recall@10", "recall@100")), f"{load_s:.0f}")
    console.print(table)
    console.print("(a sample of the corpus is easier than the whole collection: compare runs of the same sample)")
    console.print(f"\nQuery it:\n  curl -s {manifest.serve_url}/v1/search -H 'content-type: application/json' "
                  "-d '{\"query\": \"cancer immunotherapy\", \"limit\": 5}'")
    console.print(f"API docs: {manifest.serve_url}/docs    Ray dashboard: {manifest.ray_dashboard_url}")
    console.print(f"Stop it:  .venv/bin/es-ray down --state-dir {settings.state_path}")
    return scores
