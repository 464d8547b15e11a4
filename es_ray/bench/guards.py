"""What the learning guards cost honest users: click memories with and without them, on the same click logs.

    python -m es_ray.bench.guards --data DIR [--sessions-per-query 5,10,20] [--click-seeds 3]

The learning guards (es_ray/train/learning_guards.py, `learning:` in configs/stack.yaml) make a (query,
item) pair teach everybody only once several distinct clients clicked it, so a lone honest click teaches
nothing either. This measures that price where it matters, on test queries that never produced a click,
over the whole collection: the blue model with the click memories the improvement loop would store (no
fine-tune), from the simulated users of configs/clicks.yaml, each session its own client, with the
configured guards and with none (min_clients 1, no caps). Paired over the same click logs (per-query
nDCG@10 averaged over click seeds, randomisation test), for several numbers of sessions per train query:
the guards cost less as more people search the same query.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from es_ray.bench.common import write_result
from es_ray.bench.quality_harness import Dataset, Harness
from es_ray.bench.quality_stats import paired
from es_ray.config import load_settings
from es_ray.data import beir
from es_ray.demo.users import ClickModel, simulate_log
from es_ray.inference.encoder import default_model_dir
from es_ray.train.config import load_finetune_config


def unguarded(guards):
    """The same settings with the guards off: one client suffices, no caps."""
    return guards.model_copy(update={"min_clients": 1, "max_votes_per_client": 10**9,
                                     "max_sessions_per_client": 10**9})


def memories_quality(harness: Harness, sessions_per_query: int, noise: float, seed: int) -> dict[str, Any]:
    """Test quality of the blue model with click memories from one simulated click log."""
    model = dataclasses.replace(ClickModel.load().with_noise(noise), sessions_per_query=sessions_per_query)
    log = simulate_log(harness.data.train, harness.shown, harness.data.train_qrels, model, seed,
                       harness.swap_share, harness.swap_max_rank)
    # The improvement loop's evidence, read through the harness's guards, as refresh_memories reads it.
    return harness.quality(harness.base, harness.remembering(log, harness.base, debiased=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--sessions-per-query", default="5,10,20")
    parser.add_argument("--click-seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=None, help="click noise (default: configs/clicks.yaml's)")
    args = parser.parse_args(argv)

    settings = load_settings()
    path = beir.locate(args.data, settings.state_path)
    model_dir = default_model_dir()
    dataset = Dataset.load(path, model_dir, settings.model.max_length, settings.model.chunk_overlap,
                           settings.model.max_chunks)
    config = load_finetune_config()
    noise = ClickModel.load().click_noise if args.noise is None else args.noise
    harnesses = {name: Harness(dataset, config, settings.improve.memory, settings.serve.swap_share,
                               settings.serve.swap_max_rank, model_dir, guards)
                 for name, guards in (("guarded", settings.learning), ("unguarded", unguarded(settings.learning)))}
    baseline = harnesses["guarded"].quality(harnesses["guarded"].base)
    rows = []
    for per_query in [int(n) for n in args.sessions_per_query.split(",")]:
        runs = {name: [memories_quality(h, per_query, noise, 1000 * seed + 13) for seed in range(args.click_seeds)]
                for name, h in harnesses.items()}
        row = {"sessions_per_query": per_query}
        for name, results in runs.items():
            row[name] = {key: round(float(np.mean([r[key] for r in results])), 4)
                         for key in ("ndcg@10", "recall@100", "shared_ndcg@10", "new_ndcg@10") if key in results[0]}
        row["paired"] = paired([r["per_query"] for r in runs["unguarded"]], [r["per_query"] for r in runs["guarded"]])
        rows.append(row)
        print(json.dumps(row), flush=True)  # noqa: T201
    command = f"python -m es_ray.bench.guards --data {args.data or '../shared/data/' + path.name}"
    if args.sessions_per_query != "5,10,20":
        command += f" --sessions-per-query {args.sessions_per_query}"
    write_result("guards", path.name, {
        "benchmark": "guards", "noise": noise, "click_seeds": args.click_seeds,
        "guards": settings.learning.model_dump(), "baseline": {k: v for k, v in baseline.items() if k != "per_query"},
        "rows": rows}, command)


if __name__ == "__main__":
    main()
