"""The demo's main job: load a BEIR sample, then rounds of the self-improvement loop, measured.

Round 0 is the model before any click. Each round then: simulated users search the train queries and
click (position-biased click model), the improvement loop learns from those sessions, and one cycle runs
as a Ray job (fine-tune through Ray Tune -> quality gate -> deploy to Triton -> reindex into a green
collection -> switch blue -> cleanup) while search traffic runs; then quality is measured on the test
queries, which never produce a click, and on the train queries.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from tqdm import tqdm

from es_ray.client import EsRayClient
from es_ray.config import Settings
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.demo import report
from es_ray.demo.config import DemoConfig, Sample
from es_ray.demo.cycle_job import CycleJobFailed, submit_cycle_job
from es_ray.demo.traffic import SearchTraffic
from es_ray.demo.users import ClickModel, simulate_sessions
from es_ray.logs import get_logger
from es_ray.stack import control, jobs
from es_ray.stack.host import machine
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection
from es_ray.train.evaluation import evaluate

log = get_logger(__name__)
console = Console(width=None if Console().is_terminal else 150)  # a log file gets the whole (wide) table


@dataclasses.dataclass
class DemoSample:
    items: list[dict[str, Any]]
    train: dict[str, str]                  # query id -> text
    train_qrels: dict[str, dict[str, int]]
    test: dict[str, str]
    test_qrels: dict[str, dict[str, int]]


def choose_sample(data: Path, sample: Sample) -> DemoSample:
    """Seeded queries of each split, every document judged relevant to them, then random others up to
    `docs`. A collection without a train split gives half of its test queries to the simulated users."""
    rng = random.Random(sample.seed)
    queries = read_queries(data / "queries.jsonl")

    def judged(qrels: dict[str, dict[str, int]]) -> list[str]:
        chosen = sorted(q for q, docs in qrels.items() if q in queries and any(g > 0 for g in docs.values()))
        rng.shuffle(chosen)
        return chosen

    test_qrels = read_qrels(data / "qrels" / "test.tsv")
    if (data / "qrels" / "train.tsv").exists():
        train_qrels = read_qrels(data / "qrels" / "train.tsv")
        train_ids, test_ids = judged(train_qrels)[:sample.train_queries], judged(test_qrels)[:sample.test_queries]
    else:
        train_qrels, ids = test_qrels, judged(test_qrels)
        test_ids, train_ids = ids[:sample.test_queries], ids[sample.test_queries:][:sample.train_queries]
    needed = {d for qrels, ids in ((train_qrels, train_ids), (test_qrels, test_ids)) for q in ids
              for d, g in qrels[q].items() if g > 0}
    corpus = list(read_corpus(data / "corpus.jsonl"))
    others = [item for item in corpus if item["id"] not in needed]
    rng.shuffle(others)
    items = [item for item in corpus if item["id"] in needed] + others[:max(0, sample.docs - len(needed))]
    return DemoSample(items, {q: queries[q] for q in train_ids}, {q: train_qrels[q] for q in train_ids},
                      {q: queries[q] for q in test_ids}, {q: test_qrels[q] for q in test_ids})


def load(settings: Settings, manifest, data: Path, items: list[dict[str, Any]]) -> float:
    """Upserts the sample as a Ray Data job unless blue already holds every item (a second demo run)."""
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        present = Collection(blue.collection, blue.dim).get(conn, [i["id"] for i in items])
    if len(present) == len(items):
        console.print(f"blue collection {blue.collection} already holds the {len(items)} documents: not loading")
        return 0.0
    path = settings.state_path / "demo" / f"{data.name}-sample.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    console.print(f"[bold]Loading {len(items)} documents of {data} as a Ray Data job[/bold] (Triton embeds them)")
    started = time.monotonic()
    status, _ = jobs.submit_and_wait(manifest, f"python -m es_ray.data.upsert --input {path}")
    if status != "SUCCEEDED":
        raise SystemExit(f"the upsert job ended {status}; see its logs above")
    return time.monotonic() - started


def search_run(url: str, queries: dict[str, str], label: str, limit: int = 100,
               clients: int = 2) -> tuple[dict, set[str]]:
    """Top `limit` of every query through the HTTP API (not recorded as sessions); also the models that answered."""
    def one(item):
        qid, text = item
        with EsRayClient(url, timeout=120) as client:
            body = client.search(text, limit=limit, session=False)
            return qid, {r.id: r.score for r in body.results}, body.model

    with ThreadPoolExecutor(clients) as pool:
        answers = list(tqdm(pool.map(one, queries.items()), total=len(queries), desc=f"evaluate {label}",
                            unit="query"))
    return {qid: run for qid, run, _ in answers}, {model for _, _, model in answers}


def measure(url: str, sample: DemoSample, clients: int) -> tuple[dict[str, float], str]:
    test_run, models = search_run(url, sample.test, "test queries", clients=clients)
    train_run, more = search_run(url, sample.train, "train queries", limit=10, clients=clients)  # nDCG@10 only
    test, train = evaluate(test_run, sample.test_qrels), evaluate(train_run, sample.train_qrels)
    quality = {"test_ndcg@10": test["ndcg@10"], "test_mrr@10": test["mrr@10"],
               "test_recall@100": test["recall@100"], "train_ndcg@10": train["ndcg@10"]}
    return {k: round(v, 4) for k, v in quality.items()}, "/".join(sorted(models | more))


def one_round(n: int, settings: Settings, manifest, config: DemoConfig, sample: DemoSample,
              click_model: ClickModel) -> report.RoundRow:
    started = time.monotonic()
    url = manifest.serve_url
    console.rule(f"[bold]round {n}[/bold]: simulated users")
    users = dataclasses.replace(click_model, seed=click_model.seed + n)  # new sessions each round
    sessions, clicks = simulate_sessions(url, sample.train, sample.train_qrels, users, config.users.clients)
    with EsRayClient.for_stack(manifest) as admin:
        learned = admin.run_improvement(settle_s=0)
    console.print(f"{sessions} sessions, {clicks} clicks; improvement loop: {learned}")

    console.rule(f"[bold]round {n}[/bold]: cycle (fine-tune -> gate -> deploy -> reindex -> switch -> cleanup)")
    with SearchTraffic(url, list(sample.test.values()), config.traffic.clients, config.traffic.think_s) as traffic:
        try:
            result = submit_cycle_job(manifest, settings.ray.namespace, config.cycle)
        except CycleJobFailed as err:
            # Shown as the round's outcome (too few clicks yet, say); the next round has more sessions.
            console.print(f"[red]the cycle failed[/red]: {err}")
            result = {"steps": err.steps, "failed": str(err)}
    gate = next((s for s in result["steps"] if s["step"] == "gate"), {})
    if "failed" in result:
        decision, switched = f"cycle failed: {result['failed'].split(': ', 1)[-1]}"[:300], "-"
    else:
        decision = f"{gate.get('status', '?')}: {gate.get('reason', '')}".strip(": ")
        switched = (f"v{result['from_version']} -> v{result['version']}" if result.get("switched")
                    else f"v{result['version']} stopped at the {result.get('stopped_at', '?')}")
    quality, model = measure(url, sample, config.measure.clients)
    return report.RoundRow(n, model, quality, sessions, clicks, decision, switched, traffic.report.as_dict(),
                           result["steps"], round(time.monotonic() - started, 1))


def run(settings: Settings, data: Path | None, config: DemoConfig) -> Path:
    started = time.monotonic()
    data_dir = beir.locate(data, settings.state_path)
    manifest = control.up(settings)
    sample = choose_sample(data_dir, config.sample)
    load_s = load(settings, manifest, data_dir, sample.items)
    out_dir = settings.state_path / "demo"
    title = (f"{data_dir.name}: {len(sample.items)} documents, {len(sample.train)} train queries clicked, "
             f"{len(sample.test)} test queries")

    quality, model = measure(manifest.serve_url, sample, config.measure.clients)
    rows = [report.RoundRow(0, model, quality, wall_s=round(time.monotonic() - started, 1))]
    console.print(report.table(rows, title))
    click_model = ClickModel.load()
    for n in range(1, config.rounds + 1):
        rows.append(one_round(n, settings, manifest, config, sample, click_model))
        log.info("demo.round", **{k: v for k, v in dataclasses.asdict(rows[-1]).items() if k != "steps"})
        console.print(report.table(rows, title))

    context = {"dataset": data_dir.name, "docs": len(sample.items), "train_queries": len(sample.train),
               "test_queries": len(sample.test), "load_s": load_s, "wall_s": time.monotonic() - started,
               "machine": "{cores} cores, {ram_gib} GiB".format(**machine()), "config": config.model_dump()}
    plot_path = report.plot(rows, out_dir / "quality.png", title)
    report_path = report.markdown(rows, context, plot_path, out_dir / "report.md")
    url = manifest.serve_url
    console.print(f"\n[bold]Report[/bold]: {report_path}\n[bold]Plot[/bold]:   {plot_path}\n"
                  f"Finished in {context['wall_s'] / 60:.1f} minutes.\n")
    console.print(f"Search page:    {url}/            API docs: {url}/docs\n"
                  f"Ray dashboard:  {manifest.ray_dashboard_url}   Prometheus metrics: {manifest.ray_metrics_url}\n"
                  f"Query it:       curl -s {url}/v1/search -H 'content-type: application/json' "
                  "-d '{\"query\": \"cancer immunotherapy\", \"limit\": 5}'\n"
                  f"API key:        {settings.state_path / 'auth' / 'admin.key'} (X-API-Key: the web page's lifecycle "
                  "panel, items, tasks, lifecycle)\n"
                  f"Stop it:        .venv/bin/es-ray down --state-dir {settings.state_path}")
    return report_path
