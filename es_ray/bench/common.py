"""What every benchmark shares: a stack to run against, the machine's description, the results files."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from es_ray.config import Settings, load_settings
from es_ray.stack import control
from es_ray.stack.host import machine
from es_ray.stack.jobs import REPO_ROOT
from es_ray.stack.manifest import StackManifest, free_port

RESULTS = REPO_ROOT / "bench" / "results"
REPORT = REPO_ROOT / "BENCHMARKS.md"
DEFAULT_STATE = Path("/tmp/esr-bench")
SCRATCH = Path("/tmp/esr-bench-scratch")


def bench_stack(state_dir: Path = DEFAULT_STATE) -> tuple[Settings, StackManifest]:
    """Starts (or reuses) the benchmark stack: its own state dir and ports, never the user's `.es-ray/`."""
    # A replica keeps the vectors of recent query texts (serve.query_cache_entries); the benchmarks cycle
    # through a few hundred queries, so they would time cache hits, not the embedding call. Off here: every
    # search a benchmark sends is embedded, as a text the replica has not seen.
    os.environ.setdefault("ES_RAY_SERVE__QUERY_CACHE_ENTRIES", "0")
    manifest = StackManifest.load(state_dir)
    if manifest is None:
        os.environ.setdefault("ES_RAY_SERVE__PORT", str(free_port()))
        os.environ.setdefault("ES_RAY_RAY__DASHBOARD_PORT", "0")
    else:
        os.environ.setdefault("ES_RAY_SERVE__PORT", manifest.serve_url.rsplit(":", 1)[1])
    settings = load_settings(state_dir)
    return settings, control.up(settings)


def only_blue_live(manifest: StackManifest, timeout_s: float = 60) -> list[str]:
    """Drops the previous collection (and stops serving its model) now, so every write reaches blue alone;
    returns the live collections. Right after a switch the previous blue stays live for a rollback, and
    every item write is embedded and written once per live collection (dual writes), so a load measured
    then does the work twice: the ingest run on the reindex run's stack before s27 did. Even `cleanup now`
    waits CLEANUP_MARGIN_S after the switch (and a busy lifecycle lock), hence the retries."""
    from es_ray.client import EsRayClient
    from es_ray.store import blue_green, db

    deadline = time.monotonic() + timeout_s
    with EsRayClient.for_stack(manifest) as admin, db.connect(manifest.postgres_dsn) as conn:
        while True:
            live = [t.collection for t in blue_green.get_state(conn).write_targets()]
            if len(live) == 1 or time.monotonic() > deadline:
                return live
            admin.cleanup(now=True)
            time.sleep(2)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2), "n": int(len(ms))}


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def write_result(name: str, dataset: str, result: dict[str, Any], command: str, scratch: str = "",
                 machine_info: dict[str, Any] | None = None) -> Path:
    """bench/results/<name>-<dataset>.json and the tables in BENCHMARKS.md; with `scratch` (an experiment's
    name) /tmp/esr-bench-scratch/<name>-<dataset>-<scratch>.json instead, the report untouched.
    `machine_info`: the machine it was measured on, where that is not this one (bench/gpu.py)."""
    result = {**result, "dataset": dataset, "commit": git_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info or machine(), "command": command}
    folder = SCRATCH if scratch else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{dataset}{'-' + scratch if scratch else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not scratch:
        refresh_report()
    return path


def refresh_report() -> None:
    """Rewrites the generated part of BENCHMARKS.md from every results file."""
    from es_ray.bench.report import render

    text = REPORT.read_text() if REPORT.exists() else ""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    generated = f"{start}\n{render(sorted(RESULTS.glob('*.json')))}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + generated + text[text.index(end) + len(end):]
    else:
        text = text + "\n" + generated + "\n"
    REPORT.write_text(text)
