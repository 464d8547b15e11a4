"""Offline quality harness: what one cycle of learning from clicks does for queries nobody clicked.

    python -m es_ray.bench.quality --data ../shared/data/scifact

No Ray, MLflow, HTTP or Postgres: the same code the jobs run, called in-process over cached item
vectors (`corpus_vectors.py`), so one configuration and seed takes minutes on 2 cores:

1. Every item of the collection embedded once by the packaged model (cached); train and test
   queries embedded by the base query tower; each train query's top 10 by exact search is what
   simulated users are shown (one adjacent pair swapped in `serve.swap_share` of the sessions, as
   search does).
2. Clicks simulated with the position-based click model of configs/clicks.yaml (`--noise`, sessions
   per query), several click seeds; test queries never click.
3. Per log and method (naive: every click an example; debiased: the click-model posterior) and
   training seed: `train.finetune.prepare` (the job's own example building, split and held-out
   labels) and `train.trainer.fit` (the trial's own loop, the model at the end of its schedule), then
   click memories (`improve.memory`) from the same log with the fine-tuned tower's query vectors.
4. Reported: test nDCG@10 / MRR@10 / Recall@100 over the whole collection for the fine-tuned tower
   alone and for the whole system (tower + memories), split into test queries that share a relevant
   item with a train query and those that do not; validation nDCG@10 (the train queries the
   fine-tune held out, true qrels: where choices are made) and train nDCG@10; two skylines with the
   same trainer (true qrels of what was shown; all true qrels); memories alone on the base model;
   a paired randomisation test and bootstrap interval between debiased and naive over test queries;
   the gate's agreement with the test qrels (Kendall tau over every checkpoint); propensities
   estimated from the swaps against a deliberately wrong prior.

The harness itself is quality_harness.py, its statistics quality_stats.py. Results:
bench/results/quality-<dataset>.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from es_ray.bench.common import write_result
from es_ray.bench.quality_harness import Dataset, Harness
from es_ray.bench.quality_stats import gate_agreement, mean_of, paired
from es_ray.config import load_settings
from es_ray.data import beir
from es_ray.demo.users import ClickModel, simulate_log
from es_ray.inference.encoder import default_model_dir
from es_ray.store.clickstream import LoggedSession
from es_ray.train import gate
from es_ray.train.clicklog import SessionBatch, split_by_query
from es_ray.train.config import FinetuneConfig, load_finetune_config
from es_ray.train.examples import heldout_labels
from es_ray.train.finetune import prepare
from es_ray.train.propensity import Propensities, propensities
from es_ray.train.trainer import TrainingData, heldout_metrics


def with_overrides(config: FinetuneConfig, overrides: dict) -> FinetuneConfig:
    merged = config.model_dump()
    for section, values in overrides.items():
        merged[section] = {**merged[section], **values} if isinstance(values, dict) else values
    return FinetuneConfig.model_validate(merged)


def propensity_recovery(harness: Harness, config: FinetuneConfig, noise: float, seeds: list[int],
                        sessions_per_query: tuple[int, ...] = (5, 20, 100)) -> dict[str, Any]:
    """Examination ratios harvested from the swapped sessions, shrunk towards a deliberately wrong prior
    (its ratios to rank 1 flattened by 20 %), for logs of growing size."""
    model = ClickModel.load().with_noise(noise)
    true = np.asarray(model.examination_by_rank)
    ratios = true / true[0]
    flattened = true[0] * (ratios + 0.2 * (1 - ratios))
    out: dict[str, Any] = {"swap_share": harness.swap_share, "true_ratios": [round(float(v), 3) for v in ratios],
                           "prior_ratios": [round(float(v), 3) for v in flattened / flattened[0]], "target": 0.05,
                           "by_sessions_per_query": {}}
    for n in sessions_per_query:
        errors, estimates = [], []
        for seed in seeds:
            log = simulate_log(harness.data.train, harness.shown, harness.data.train_qrels,
                               dataclasses.replace(model, sessions_per_query=n), seed, harness.swap_share,
                               harness.swap_max_rank)
            props = propensities(log, list(flattened), "estimate", config.debias.min_rank_variation,
                                 config.debias.propensity_prior_strength)
            estimate = props.by_rank / props.by_rank[0]
            estimates.append([round(float(v), 3) for v in estimate])
            errors.append(round(float(np.max(np.abs(estimate - ratios))), 4))
        out["by_sessions_per_query"][str(n)] = {"sessions": n * len(harness.data.train), "max_abs_error": errors,
                                                "estimated_ratios": estimates}
    return out


@dataclass
class Plan:
    noises: list[float]
    click_seeds: list[int]
    train_seeds: list[int]
    methods: list[str]
    skylines: bool = True
    propensity_sessions_per_query: tuple[int, ...] = (5, 20, 100)


def _print_line(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)  # noqa: T201


def measure(dataset: Dataset, harness: Harness, config: FinetuneConfig, plan: Plan,
            progress: Callable[[dict[str, Any]], None] = _print_line) -> dict[str, Any]:
    """Every (noise, click seed, method, training seed) run, their means, the paired tests, the gate's
    agreement, the propensity recovery and the skylines."""
    started = time.monotonic()
    baseline = harness.quality(harness.base)
    result: dict[str, Any] = {
        "benchmark": "quality", "docs": len(dataset.items), "chunks": int(len(dataset.items.chunks)),
        "train_queries": len(dataset.train), "test_queries": len(dataset.test), "validation_queries": len(harness.val),
        "baseline": {k: v for k, v in baseline.items() if k != "per_query"},
        "default_noise": ClickModel.load().click_noise,
        "seeds": {"clicks": len(plan.click_seeds), "train": len(plan.train_seeds)},
        "overlap": {"test_sharing_a_relevant_item": len(harness.shared),
                    "test_not_sharing": len(dataset.test) - len(harness.shared)},
        "config": {"trial": config.trial, "train": config.train.model_dump(), "debias": config.debias.model_dump(),
                   "memory": harness.memory.model_dump(), "swap_share": harness.swap_share},
        "by_noise": {}}
    progress({"baseline": result["baseline"]})
    runs = Runs(dataset, harness, config, plan, baseline, progress)
    for noise in plan.noises:
        result["by_noise"][str(noise)] = runs.at_noise(noise)
    result["gate"] = gate_agreement(runs.logs, runs.gate_checks, runs.worse_checks, config.gate.margin)
    result["propensity"] = propensity_recovery(harness, config, result["default_noise"],
                                               [1000 * s + 13 for s in plan.click_seeds],
                                               plan.propensity_sessions_per_query)
    if plan.skylines:
        result["skylines"] = {"shown_qrels": mean_of([harness.skyline(True, config)]),
                              "all_qrels": mean_of([harness.skyline(False, config)])}
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


@dataclass
class Runs:
    """The plan's fine-tunes, log by log, and what they collect for the gate's agreement."""

    dataset: Dataset
    harness: Harness
    config: FinetuneConfig
    plan: Plan
    baseline: dict[str, Any]
    progress: Callable[[dict[str, Any]], None]
    # Per click log and method: the blue model and every checkpoint as the gate sees them (`gate_point`),
    # all scored with that method's held-out labels.
    logs: list[dict[str, list[tuple[float, ...]]]] = field(default_factory=list)
    gate_checks: list[dict[str, Any]] = field(default_factory=list)
    worse_checks: list[dict[str, Any]] = field(default_factory=list)

    def at_noise(self, noise: float) -> dict[str, Any]:
        """Every click log at one noise level: each method's mean scores, memories alone, the paired tests."""
        methods = self.plan.methods
        scores: dict[str, dict[str, list]] = {m: {"tower": [], "system": []} for m in methods}
        memory_only: list[dict[str, Any]] = []
        for click_seed in self.plan.click_seeds:
            sessions = self.harness.click_log(noise, 1000 * click_seed + 13)
            self.logs.append({method: self.on_log(noise, click_seed, sessions, method, scores[method], memory_only)
                              for method in methods})
        entry: dict[str, Any] = {m: {part: mean_of(rows) for part, rows in scores[m].items()} for m in methods}
        entry["memories_only"] = mean_of(memory_only)
        if "naive" in methods and "debiased" in methods:
            entry["paired_tower"] = paired([r["per_query"] for r in scores["naive"]["tower"]],
                                           [r["per_query"] for r in scores["debiased"]["tower"]])
            entry["paired_system"] = paired([r["per_query"] for r in scores["naive"]["system"]],
                                            [r["per_query"] for r in scores["debiased"]["system"]])
            entry["paired_p"] = entry["paired_tower"]["p_randomisation"]
        return entry

    def on_log(self, noise: float, click_seed: int, sessions: list[LoggedSession], method: str,
               scores: dict[str, list], memory_only: list[dict[str, Any]]) -> list[tuple[float, ...]]:
        """One method's fine-tunes (one per training seed) on one click log; returns the gate's view of
        the blue model and of every checkpoint. The last method also measures memories alone and the
        degraded blue models."""
        harness, base, last, debiased = self.harness, self.harness.base, method == self.plan.methods[-1], method != "naive"
        cfg = with_overrides(self.config, {"debias": {"enabled": debiased}})
        data, details = prepare(SessionBatch(sessions), self.dataset.items, self.dataset.texts, harness.parent, cfg)
        if last:
            memory_only.append(harness.system(sessions, base, debiased))
        blue_heldout = heldout_metrics(base.model, base.tokenizer, data, "cpu")
        graded = graded_heldout(sessions, data, details, cfg)
        points = [harness.gate_point(blue_heldout, base.model, base.tokenizer, graded, cfg.model.max_query_length)]
        if last:
            self.worse_checks += harness.degraded_checks(data, blue_heldout, cfg.gate, self.baseline["ndcg@10"],
                                                         click_seed)
        for train_seed in self.plan.train_seeds:
            cfg_seed = with_overrides(cfg, {"train": {"seed": cfg.train.seed + train_seed}})
            t0 = time.monotonic()
            tower = harness.fine_tune(data, cfg_seed, points, graded)
            tower_q = harness.quality(tower)
            system_q = harness.system(sessions, tower, debiased)
            decision = gate.decide(heldout_metrics(tower.model, tower.tokenizer, data, "cpu"), blue_heldout, cfg.gate)
            self.gate_checks.append({"test_gain": round(tower_q["ndcg@10"] - self.baseline["ndcg@10"], 4),
                                     "heldout_gain": round(decision.new - decision.blue, 4),
                                     "passed": decision.candidate})
            scores["tower"].append(tower_q)
            scores["system"].append(system_q)
            self.progress({"noise": noise, "click_seed": click_seed, "method": method, "train_seed": train_seed,
                           "seconds": round(time.monotonic() - t0, 1),
                           "tower": {k: v for k, v in tower_q.items() if k != "per_query"},
                           "system": {k: v for k, v in system_q.items() if k != "per_query"},
                           "gate": decision.reason, "examples": details["examples"],
                           "propensity_source": details["propensity_source"], "propensity": details["propensity"]})
        return points


def graded_heldout(sessions: list[LoggedSession], data: TrainingData, details: dict[str, Any],
                   cfg: FinetuneConfig) -> TrainingData:
    """For comparison: the same held-out sessions with graded labels (10 x P(relevant))."""
    _, heldout_side = split_by_query(sessions, cfg.data.split_seed, cfg.data.heldout_fraction)
    props = Propensities(np.asarray(details["propensity"]), details["propensity_source"])
    graded_labels = heldout_labels(heldout_side, props)
    return dataclasses.replace(data, heldout_qrels={q: graded_labels.qrels.get(q, {}) for q in data.heldout_qrels})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--noise", default="", help="click noise levels, comma-separated (default: clicks.yaml's, "
                                                    "and twice that)")
    parser.add_argument("--click-seeds", type=int, default=3)
    parser.add_argument("--train-seeds", type=int, default=1)
    parser.add_argument("--methods", default="naive,debiased")
    parser.add_argument("--overrides", default="{}", help="JSON merged over configs/finetune.yaml")
    parser.add_argument("--no-skylines", action="store_true")
    parser.add_argument("--scratch", default="", help="an experiment's name: results go to /tmp/esr-bench-scratch/, "
                                                      "not bench/results/ and BENCHMARKS.md")
    args = parser.parse_args(argv)

    settings = load_settings()
    path = beir.locate(args.data, settings.state_path)
    overrides = json.loads(args.overrides)
    config = load_finetune_config(overrides=overrides)
    model_dir = default_model_dir()
    dataset = Dataset.load(path, model_dir, settings.model.max_length, settings.model.chunk_overlap,
                           settings.model.max_chunks)
    harness = Harness(dataset, config, settings.improve.memory, settings.serve.swap_share, settings.serve.swap_max_rank,
                      model_dir)
    default_noise = ClickModel.load().click_noise
    plan = Plan([float(n) for n in args.noise.split(",")] if args.noise else [default_noise, 2 * default_noise],
                list(range(args.click_seeds)), list(range(args.train_seeds)), args.methods.split(","),
                not args.no_skylines)
    result = measure(dataset, harness, config, plan)
    result["config"]["finetune_overrides"] = overrides
    command = f"python -m es_ray.bench.quality --data {args.data or '../shared/data/' + path.name}"
    for flag, value, default in (("--noise", args.noise, ""), ("--click-seeds", args.click_seeds, 3),
                                 ("--train-seeds", args.train_seeds, 1), ("--methods", args.methods, "naive,debiased"),
                                 ("--overrides", args.overrides, "{}")):
        if value != default:
            command += f" {flag} '{value}'" if flag == "--overrides" else f" {flag} {value}"
    if args.no_skylines:
        command += " --no-skylines"
    out = write_result("quality", path.name, result, command, scratch=args.scratch)
    print(json.dumps({k: result[k] for k in ("baseline", "by_noise")}, indent=1), f"\nwritten to {out}")  # noqa: T201


if __name__ == "__main__":
    main()
