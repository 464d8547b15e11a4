"""The demo's main job: load a BEIR sample, then rounds of the self-improvement loop, measured.

Round 0 is the model before any click. Each round then: simulated users search the train queries and
click (position-biased click model), the improvement loop learns from those sessions, and one cycle runs
as a Ray job (fine-tune through Ray Tune -> quality gate -> deploy to Triton -> reindex into a green
collection -> switch blue -> cleanup) while search traffic runs; then quality is measured on the test
queries, which never produce a click, and on the train queries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape

from es_ray.client import EsRayClient
from es_ray.config import Settings
from es_ray.console import Bar, Display, parse_progress
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.demo import report
from es_ray.demo.addresses import MEASUREMENT, person_address
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


def follow_progress(bar: Bar, name: str) -> Callable[[str], None]:
    """A Ray job's output follower: the job's progress lines named `name` move `bar`; every line goes on
    to stdout, which is the log file inside logs.to_file."""
    pending = [""]

    def on_output(text: str) -> None:
        print(text, end="", flush=True)  # noqa: T201 - the job's own log, kept in the command's log file
        *lines, pending[0] = (pending[0] + text).split("\n")
        for line in lines:
            progress = parse_progress(line)
            if progress and progress[0] == name:
                bar.update(progress[1], total=progress[2])

    return on_output


def load(settings: Settings, manifest, data: Path, items: list[dict[str, Any]], display: Display) -> float:
    """Upserts the sample as a Ray Data job unless blue already holds every item (a second demo run)."""
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        present = Collection(blue.collection, blue.dim).get(conn, [i["id"] for i in items])
    if len(present) == len(items):
        display.note(f"blue collection {blue.collection} already holds the {len(items)} documents: not loading")
        return 0.0
    path = settings.state_path / "demo" / f"{data.name}-sample.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    display.step(f"loading {len(items)} documents of {data.name} as a Ray Data job (Triton embeds them)")
    started = time.monotonic()
    with display.bar("upsert", total=len(items), unit="items") as bar:
        status, _ = jobs.submit_and_wait(manifest, f"python -m es_ray.data.upsert --input {path}",
                                         on_output=follow_progress(bar, "upsert"))
    if status != "SUCCEEDED":
        raise RuntimeError(f"the upsert job ended {status}; its output is in the log file")
    return time.monotonic() - started


def search_run(url: str, queries: dict[str, str], label: str, limit: int = 100,
               clients: int = 2, display: Display | None = None) -> tuple[dict, set[str]]:
    """Top `limit` of every query through the HTTP API (not recorded as sessions); also the models that answered.
    Each query from its own loopback address (demo/addresses.py), not with the API key: the measure is
    what an anonymous person is shown, and hundreds of queries from one address would be rate limited."""
    def one(item):
        n, (qid, text) = item
        with EsRayClient(url, timeout=120, local_address=person_address(MEASUREMENT, n)) as client:
            body = client.search(text, limit=limit, session=False)
            return qid, {r.id: r.score for r in body.results}, body.model

    answers = []
    bar = display.bar(f"search {label}", total=len(queries), unit="queries") if display else None
    with ThreadPoolExecutor(clients) as pool, bar or contextlib.nullcontext():
        for answer in pool.map(one, enumerate(queries.items())):
            answers.append(answer)
            if bar:
                bar.advance()
    return {qid: run for qid, run, _ in answers}, {model for _, _, model in answers}


def measure(url: str, sample: DemoSample, clients: int, display: Display) -> tuple[dict[str, float], str]:
    test_run, models = search_run(url, sample.test, "test queries", clients=clients, display=display)
    train_run, more = search_run(url, sample.train, "train queries", limit=10, clients=clients,  # nDCG@10 only
                                 display=display)
    test, train = evaluate(test_run, sample.test_qrels), evaluate(train_run, sample.train_qrels)
    quality = {"test_ndcg@10": test["ndcg@10"], "test_mrr@10": test["mrr@10"],
               "test_recall@100": test["recall@100"], "train_ndcg@10": train["ndcg@10"]}
    return {k: round(v, 4) for k, v in quality.items()}, "/".join(sorted(models | more))


def one_round(n: int, settings: Settings, manifest, config: DemoConfig, sample: DemoSample,
              click_model: ClickModel, display: Display) -> report.RoundRow:
    started = time.monotonic()
    url = manifest.serve_url
    display.step(f"round {n}: simulated users search the {len(sample.train)} train queries and click "
                 f"({len(sample.train) * click_model.sessions_per_query} sessions)")
    users = dataclasses.replace(click_model, seed=click_model.seed + n)  # new sessions each round
    sessions, clicks = simulate_sessions(url, sample.train, sample.train_qrels, users, config.users.clients)
    display.step(f"round {n}: the improvement loop learns from the clicks")
    with EsRayClient.for_stack(manifest) as admin:
        learned = admin.run_improvement(settle_s=0)
    display.note(f"round {n}: {sessions} sessions, {clicks} clicks; improvement loop: {escape(str(learned))}")

    display.step(f"round {n}: cycle (fine-tune -> gate -> deploy -> reindex -> switch -> cleanup)")
    with SearchTraffic(url, list(sample.test.values()), config.traffic.clients, config.traffic.think_s) as traffic:
        try:
            result = submit_cycle_job(manifest, settings.ray.namespace, config.cycle, display)
        except CycleJobFailed as err:
            # Shown as the round's outcome (too few clicks yet, say); the next round has more sessions.
            log.warning("demo.cycle_failed", round=n, error=str(err))
            display.note(f"[red]round {n}: the cycle failed[/red]: {escape(str(err).splitlines()[0])}")
            result = {"steps": err.steps, "failed": str(err)}
    gate = next((s for s in result["steps"] if s["step"] == "gate"), {})
    if "failed" in result:
        decision, switched = f"cycle failed: {result['failed'].split(': ', 1)[-1]}"[:300], "-"
    else:
        decision = f"{gate.get('status', '?')}: {gate.get('reason', '')}".strip(": ")
        switched = (f"v{result['from_version']} -> v{result['version']}" if result.get("switched")
                    else f"v{result['version']} stopped at the {result.get('stopped_at', '?')}")
    display.step(f"round {n}: measuring quality")
    quality, model = measure(url, sample, config.measure.clients, display)
    return report.RoundRow(n, model, quality, sessions, clicks, decision, switched, traffic.report.as_dict(),
                           result["steps"], round(time.monotonic() - started, 1))


def run(settings: Settings, data: Path | None, config: DemoConfig, display: Display) -> Path:
    started = time.monotonic()
    display.step("finding the data")
    data_dir = beir.locate(data, settings.state_path)
    display.step("stack")
    manifest = control.up(settings, display=display)
    display.step("choosing the sample")
    sample = choose_sample(data_dir, config.sample)
    load_s = load(settings, manifest, data_dir, sample.items, display)
    out_dir = settings.state_path / "demo"
    title = (f"{data_dir.name}: {len(sample.items)} documents, {len(sample.train)} train queries clicked, "
             f"{len(sample.test)} test queries")

    display.step("round 0: measuring quality before any click")
    quality, model = measure(manifest.serve_url, sample, config.measure.clients, display)
    rows = [report.RoundRow(0, model, quality, wall_s=round(time.monotonic() - started, 1))]
    display.table(title, report.HEADERS, left=("gate", "switch"))
    display.add_row(rows[0].cells(brief=True))
    click_model = ClickModel.load()
    for n in range(1, config.rounds + 1):
        rows.append(one_round(n, settings, manifest, config, sample, click_model, display))
        log.info("demo.round", **{k: v for k, v in dataclasses.asdict(rows[-1]).items() if k != "steps"})
        display.add_row(rows[-1].cells(brief=True))
    display.step("writing the report")

    context = {"dataset": data_dir.name, "docs": len(sample.items), "train_queries": len(sample.train),
               "test_queries": len(sample.test), "load_s": load_s, "wall_s": time.monotonic() - started,
               "machine": "{cores} cores, {ram_gib} GiB".format(**machine()), "config": config.model_dump()}
    plot_path = report.plot(rows, out_dir / "quality.png", title)
    report_path = report.markdown(rows, context, plot_path, out_dir / "report.md")
    url = manifest.serve_url
    display.note(f"\n[bold]Report[/bold]: {report_path}\n[bold]Plot[/bold]:   {plot_path}\n"
                 f"Finished in {context['wall_s'] / 60:.1f} minutes.\n")
    display.note(f"Search page:    {url}/            API docs: {url}/docs\n"
                 f"Ray dashboard:  {manifest.ray_dashboard_url}   Prometheus metrics: {manifest.ray_metrics_url}\n"
                 f"Query it:       curl -s {url}/v1/search -H 'content-type: application/json' "
                 "-d '{\"query\": \"cancer immunotherapy\", \"limit\": 5}'\n"
                 f"API key:        {settings.state_path / 'auth' / 'admin.key'} (X-API-Key: the web page's lifecycle "
                 "panel, items, tasks, lifecycle)\n"
                 f"Stop it:        .venv/bin/es-ray down --state-dir {settings.state_path}")
    return report_path
