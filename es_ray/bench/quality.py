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

Results: bench/results/quality-<dataset>.json and BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from es_ray.demo.users import ClickModel, simulate_log
from es_ray.bench.common import write_result
from es_ray.bench.corpus_vectors import CACHE_DIR, collection_vectors
from es_ray.config import load_settings
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.improve.memory import clicked_pair_weights, item_memories, remembered
from es_ray.inference.encoder import default_model_dir, load_encoder, load_tokenizer
from es_ray.train import gate
from es_ray.store.clickstream import LoggedSession, normalise_query
from es_ray.train.clicklog import SessionBatch, is_heldout, split_by_query
from es_ray.train.config import FinetuneConfig, GateConfig, load_finetune_config
from es_ray.train.examples import heldout_labels
from es_ray.train.finetune import ParentModel, prepare
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.metrics import evaluate, per_query
from es_ray.train.propensity import Impressions, Propensities, propensities
from es_ray.train.trainer import (Hyperparameters, TrainingData, fit, heldout_metrics, heldout_metrics_of,
                                  query_vectors)

METRICS = ("ndcg@10", "mrr@10", "recall@100")


@dataclass
class Dataset:
    name: str
    items: ItemVectors
    texts: dict[str, str]
    train: dict[str, str]                  # train query id -> text
    test: dict[str, str]
    train_qrels: dict[str, dict[str, int]]
    test_qrels: dict[str, dict[str, int]]

    @classmethod
    def load(cls, path: Path, model_dir: Path, max_length: int, overlap: int, max_chunks: int,
             cache_dir: Path = CACHE_DIR) -> "Dataset":
        queries = read_queries(path / "queries.jsonl")
        train_qrels, test_qrels = read_qrels(path / "qrels" / "train.tsv"), read_qrels(path / "qrels" / "test.tsv")

        def judged(qrels):
            return {q: queries[q] for q, docs in sorted(qrels.items()) if q in queries and any(g > 0 for g in docs.values())}

        return cls(path.name, collection_vectors(path, model_dir, max_length, overlap, max_chunks, cache_dir),
                   {i["id"]: i["text"] for i in read_corpus(path / "corpus.jsonl")},
                   judged(train_qrels), judged(test_qrels), train_qrels, test_qrels)

    def shares_relevant(self) -> set[str]:
        """Test queries with a relevant item that is also relevant to some train query."""
        taught = {d for q in self.train for d, g in self.train_qrels[q].items() if g > 0}
        return {q for q in self.test if any(g > 0 and d in taught for d, g in self.test_qrels[q].items())}


class Tower:
    """A query tower: vectors for query texts, cached (the harness asks for the same texts often)."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self._cache: dict[str, np.ndarray] = {}

    def vectors(self, texts: list[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            self._cache.update(zip(missing, query_vectors(self.model, self.tokenizer, missing, self.max_length)))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)


class Harness:
    def __init__(self, dataset: Dataset, config: FinetuneConfig, memory, swap_share: float, swap_max_rank: int,
                 model_dir: Path):
        self.data, self.config, self.memory = dataset, config, memory
        self.swap_share, self.swap_max_rank = swap_share, swap_max_rank
        self.parent = ParentModel(0, model_dir, dataset.items.chunks.shape[1], 256)
        self.base = Tower(load_encoder(model_dir), load_tokenizer(model_dir), config.model.max_query_length)
        train_ids = sorted(dataset.train)
        vectors = self.base.vectors([dataset.train[q] for q in train_ids])
        top = dataset.items.rank(vectors, train_ids, k=len(ClickModel.load().examination_by_rank))
        self.shown = {q: list(top[q]) for q in train_ids}
        # The fine-tune holds out queries by a seeded hash of their text: those are the validation split.
        self.val = {q for q in train_ids if is_heldout(dataset.train[q], config.data.split_seed,
                                                       config.data.heldout_fraction)}
        self.shared = dataset.shares_relevant()

    # -- measuring -------------------------------------------------------------------------------
    def quality(self, tower: Tower, items: ItemVectors | None = None, val_items: ItemVectors | None = None
                ) -> dict[str, Any]:
        """Test metrics over the whole collection (all, shared, new), validation and train nDCG@10."""
        d = self.data
        items = items or d.items
        test_ids = sorted(d.test)
        test_run = items.rank(tower.vectors([d.test[q] for q in test_ids]), test_ids, k=100)
        out: dict[str, Any] = {k: round(v, 4) for k, v in evaluate(test_run, d.test_qrels).items() if k in METRICS}
        by_query = per_query(test_run, d.test_qrels)
        out["shared_ndcg@10"] = round(float(np.mean([v for q, v in by_query.items() if q in self.shared])), 4)
        out["new_ndcg@10"] = round(float(np.mean([v for q, v in by_query.items() if q not in self.shared])), 4)
        for label, ids, its in (("val", sorted(self.val), val_items or items),
                                ("train", sorted(set(d.train) - self.val), items)):
            run = its.rank(tower.vectors([d.train[q] for q in ids]), ids, k=100)
            out[f"{label}_ndcg@10"] = round(evaluate(run, d.train_qrels)["ndcg@10"], 4)
        out["per_query"] = by_query
        return out

    def test_ndcg(self, tower: Tower) -> float:
        ids = sorted(self.data.test)
        run = self.data.items.rank(tower.vectors([self.data.test[q] for q in ids]), ids, k=10)
        return evaluate(run, self.data.test_qrels)["ndcg@10"]

    # -- learning --------------------------------------------------------------------------------
    def click_log(self, noise: float, seed: int) -> list[LoggedSession]:
        model = ClickModel.load().with_noise(noise)
        return simulate_log(self.data.train, self.shown, self.data.train_qrels, model, seed, self.swap_share,
                            self.swap_max_rank)

    def hyperparameters(self, config: FinetuneConfig) -> Hyperparameters:
        return Hyperparameters.from_config({**config.trial, **config.train.model_dump()})

    def gate_point(self, metrics: dict[str, float], model, tokenizer, graded: TrainingData, max_length: int
                   ) -> tuple[float, ...]:
        """One model as the gate could see it, beside its test nDCG@10: (held-out nDCG@10, held-out nDCG@10
        over the whole collection, test nDCG@10, held-out MRR@10, log-likelihood of the clicked among the
        shown, held-out nDCG@10 with graded labels). `metrics`: its heldout_metrics."""
        return (metrics["ndcg@10"], metrics["whole_ndcg@10"], self.test_ndcg(Tower(model, tokenizer, max_length)),
                metrics["mrr@10"], metrics["shown_log_likelihood"],
                heldout_metrics(model, tokenizer, graded, "cpu")["ndcg@10"])

    def fine_tune(self, data: TrainingData, config: FinetuneConfig, trace: list | None = None,
                  graded: TrainingData | None = None) -> Tower:
        """fit() with the job's checkpoint rule (the model at the end of the schedule); `trace` gets the
        gate's view of every evaluation (`gate_point`, with `graded` the same data with graded labels)."""
        last = {"state": None}
        tokenizer = load_tokenizer(self.parent.model_dir)

        def on_eval(metrics, model, _tokenizer):
            if trace is not None:
                trace.append(self.gate_point(metrics, model, tokenizer, graded or data, config.model.max_query_length))
            if metrics["step"] == metrics["total_steps"]:
                last["state"] = copy.deepcopy(model.state_dict())

        fit(data, self.hyperparameters(config), on_eval)
        model = load_encoder(self.parent.model_dir)
        model.load_state_dict(last["state"])
        return Tower(model, tokenizer, config.model.max_query_length)

    def degraded_checks(self, data: TrainingData, blue_heldout: dict[str, float], config: GateConfig,
                        baseline: float, seed: int) -> list[dict[str, Any]]:
        """The gate on worse models: the blue model's query vectors with Gaussian noise (sd 0.01 to 0.05,
        3 draws each), for held-out and test queries alike."""
        rng = np.random.default_rng(seed)
        held = self.base.vectors([data.heldout_queries[q] for q in sorted(data.heldout_queries)])
        test_ids = sorted(self.data.test)
        test = self.base.vectors([self.data.test[q] for q in test_ids])

        def noisy(v: np.ndarray, sd: float) -> np.ndarray:
            v = v + rng.normal(0.0, sd, v.shape).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        checks = []
        for sd in (0.01, 0.02, 0.03, 0.05):
            for _ in range(3):
                decision = gate.decide(heldout_metrics_of(noisy(held, sd), data), blue_heldout, config)
                run = self.data.items.rank(noisy(test, sd), test_ids, k=10)
                checks.append({"sd": sd, "test_gain": round(evaluate(run, self.data.test_qrels)["ndcg@10"] - baseline, 4),
                               "heldout_gain": round(decision.new - decision.blue, 4), "passed": decision.candidate})
        return checks

    def remembering(self, sessions: list[LoggedSession], tower: Tower, debiased: bool) -> ItemVectors:
        """The item vectors with click memories from `sessions`, as the improvement loop stores them
        (`improve.loop.refresh_memories`: pairs weighted by the click model's P(relevant) with the
        configured examination curve); naive: raw click counts."""
        if debiased:
            weights = clicked_pair_weights(Impressions.from_sessions(sessions, max_rank=10**6),
                                           Propensities(np.asarray(self.config.debias.examination_prior), "config"))
        else:
            weights = {}
            for s in sessions:
                for item in s.clicked:
                    key = (normalise_query(s.query), item)
                    weights[key] = weights.get(key, 0.0) + 1.0
        texts = {normalise_query(s.query): s.query for s in sessions}
        keys = sorted(texts)
        vectors = dict(zip(keys, tower.vectors([texts[k] for k in keys]))) if keys else {}
        memories = item_memories(vectors, weights)
        items = self.data.items
        chunks = items.chunks.copy()
        for number, object_id in enumerate(items.ids):
            if object_id in memories:
                lo, hi = np.searchsorted(items.owner, number), np.searchsorted(items.owner, number, side="right")
                chunks[lo:hi] = remembered(chunks[lo:hi], memories[object_id], self.memory.weight,
                                           self.memory.evidence_half)
        return ItemVectors(items.ids, chunks, items.owner)

    def system(self, sessions: list[LoggedSession], tower: Tower, debiased: bool) -> dict[str, Any]:
        """Tower + memories: test with memories from every session, validation with memories from the
        fine-tune's train side only (a held-out query must not find its own clicks)."""
        train_side, _ = split_by_query(sessions, self.config.data.split_seed, self.config.data.heldout_fraction)
        return self.quality(tower, self.remembering(sessions, tower, debiased),
                            self.remembering(train_side, tower, debiased))

    def skyline(self, shown_only: bool, config: FinetuneConfig) -> dict[str, Any]:
        """The same trainer on true labels: every relevant item of a train query (or only those the
        users were shown), one example each; held-out labels the true qrels too."""
        d, index = self.data, self.data.items.index()
        fit_ids = sorted(set(d.train) - self.val)
        queries, positives, excluded = [], [], {}
        for q in fit_ids:
            relevant = [x for x, g in d.train_qrels[q].items() if g > 0 and x in index
                        and (not shown_only or x in self.shown[q])]
            queries += [d.train[q]] * len(relevant)
            positives += [index[x] for x in relevant]
            excluded[d.train[q]] = np.asarray(sorted(index[x] for x in relevant), dtype=np.int64)
        val_ids = sorted(self.val)
        template, _ = prepare(SessionBatch(self.click_log(0.0, 0)), d.items, d.texts, self.parent, config)
        data = copy.copy(template)
        data.queries, data.positives = queries, np.asarray(positives, dtype=np.int64)
        data.weights, data.excluded = np.ones(len(queries)), excluded
        data.heldout_queries = {q: d.train[q] for q in val_ids}
        data.heldout_qrels = {q: d.train_qrels[q] for q in val_ids}
        data.heldout_shown = {q: sorted(index) for q in val_ids}
        data.epoch_size = len(queries)
        return self.quality(self.fine_tune(data, config))


def with_overrides(config: FinetuneConfig, overrides: dict) -> FinetuneConfig:
    merged = config.model_dump()
    for section, values in overrides.items():
        merged[section] = {**merged[section], **values} if isinstance(values, dict) else values
    return FinetuneConfig.model_validate(merged)


def mean_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}


def paired(a: list[dict[str, float]], b: list[dict[str, float]], seed: int = 0) -> dict[str, float]:
    """b - a over test queries (per-query nDCG@10 averaged over runs first): a two-sided paired
    randomisation test and a 95% bootstrap interval of the mean difference (scipy.stats)."""
    queries = sorted(a[0])
    x = np.asarray([np.mean([run[q] for run in a]) for q in queries])
    y = np.asarray([np.mean([run[q] for run in b]) for q in queries])
    test = stats.permutation_test((x, y), lambda u, v: np.mean(v - u), permutation_type="samples",
                                  n_resamples=10_000, random_state=seed)
    interval = stats.bootstrap(((y - x),), np.mean, n_resamples=10_000, random_state=seed).confidence_interval
    return {"mean_difference": round(float(np.mean(y - x)), 4), "p_randomisation": round(float(test.pvalue), 4),
            "bootstrap_95": [round(float(interval.low), 4), round(float(interval.high), 4)]}


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


def measure(dataset: Dataset, harness: Harness, config: FinetuneConfig, plan: Plan,
            progress=lambda line: print(json.dumps(line), flush=True)) -> dict[str, Any]:  # noqa: T201
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
    # Per click log and method: the blue model and every checkpoint as the gate sees them (`gate_point`),
    # all scored with that method's held-out labels.
    logs: list[dict[str, list[tuple[float, ...]]]] = []
    gate_checks: list[dict[str, Any]] = []
    worse_checks: list[dict[str, Any]] = []
    for noise in plan.noises:
        runs: dict[str, dict[str, list]] = {m: {"tower": [], "system": []} for m in plan.methods}
        memory_only: list[dict[str, Any]] = []
        for click_seed in plan.click_seeds:
            sessions = harness.click_log(noise, 1000 * click_seed + 13)
            by_method: dict[str, list[tuple[float, ...]]] = {}
            for method in plan.methods:
                cfg = with_overrides(config, {"debias": {"enabled": method != "naive"}})
                data, details = prepare(SessionBatch(sessions), dataset.items, dataset.texts, harness.parent, cfg)
                if method == plan.methods[-1]:
                    memory_only.append(harness.system(sessions, harness.base, method != "naive"))
                blue_heldout = heldout_metrics(harness.base.model, harness.base.tokenizer, data, "cpu")
                # For comparison: the same held-out sessions with graded labels (10 x P(relevant)).
                _, heldout_side = split_by_query(sessions, cfg.data.split_seed, cfg.data.heldout_fraction)
                props = Propensities(np.asarray(details["propensity"]), details["propensity_source"])
                graded_labels = heldout_labels(heldout_side, props)
                graded = dataclasses.replace(data, heldout_qrels={q: graded_labels.qrels.get(q, {})
                                                                  for q in data.heldout_qrels})
                points = by_method[method] = [harness.gate_point(blue_heldout, harness.base.model,
                                                                 harness.base.tokenizer, graded,
                                                                 cfg.model.max_query_length)]
                if method == plan.methods[-1]:
                    worse_checks += harness.degraded_checks(data, blue_heldout, cfg.gate, baseline["ndcg@10"],
                                                            click_seed)
                for train_seed in plan.train_seeds:
                    cfg_seed = with_overrides(cfg, {"train": {"seed": cfg.train.seed + train_seed}})
                    t0 = time.monotonic()
                    tower = harness.fine_tune(data, cfg_seed, points, graded)
                    tower_q = harness.quality(tower)
                    system_q = harness.system(sessions, tower, method != "naive")
                    decision = gate.decide(heldout_metrics(tower.model, tower.tokenizer, data, "cpu"), blue_heldout,
                                           cfg.gate)
                    gate_checks.append({"test_gain": round(tower_q["ndcg@10"] - baseline["ndcg@10"], 4),
                                        "heldout_gain": round(decision.new - decision.blue, 4),
                                        "passed": decision.candidate})
                    runs[method]["tower"].append(tower_q)
                    runs[method]["system"].append(system_q)
                    progress({"noise": noise, "click_seed": click_seed, "method": method, "train_seed": train_seed,
                              "seconds": round(time.monotonic() - t0, 1),
                              "tower": {k: v for k, v in tower_q.items() if k != "per_query"},
                              "system": {k: v for k, v in system_q.items() if k != "per_query"},
                              "gate": decision.reason, "examples": details["examples"],
                              "propensity_source": details["propensity_source"],
                              "propensity": details["propensity"]})
            logs.append(by_method)
        entry: dict[str, Any] = {m: {part: mean_of(rows) for part, rows in runs[m].items()} for m in plan.methods}
        entry["memories_only"] = mean_of(memory_only)
        if "naive" in plan.methods and "debiased" in plan.methods:
            entry["paired_tower"] = paired([r["per_query"] for r in runs["naive"]["tower"]],
                                           [r["per_query"] for r in runs["debiased"]["tower"]])
            entry["paired_system"] = paired([r["per_query"] for r in runs["naive"]["system"]],
                                            [r["per_query"] for r in runs["debiased"]["system"]])
            entry["paired_p"] = entry["paired_tower"]["p_randomisation"]
        result["by_noise"][str(noise)] = entry

    def tau(points, column):
        return float(stats.kendalltau([p[column] for p in points], [p[2] for p in points]).statistic)

    series = [points for by_method in logs for points in by_method.values() if len(points) > 2]
    taus = [tau(points, 0) for points in series]
    whole = [tau(points, 1) for points in series]
    others = {name: round(float(np.nanmean([tau(points, column) for points in series])), 4)
              for name, column in (("condensed_mrr@10", 3), ("shown_log_likelihood", 4), ("graded_labels", 5))
              if series}
    better = [g for g in gate_checks if g["test_gain"] >= 0.01]
    worse = [g for g in worse_checks if g["test_gain"] <= -0.01]
    # Every checkpoint against the blue model of its log, as the gate would compare them.
    ahead = [(p[0] > points[0][0]) for points in series for p in points[1:] if p[2] - points[0][2] >= 0.01]
    result["gate"] = {
        "candidates": "per click log and method: the blue model and every checkpoint of that method's runs on "
                      "that log, scored by the method's held-out labels and by the test qrels",
        "kendall_tau_mean": round(float(np.nanmean(taus)), 4) if taus else None,
        "kendall_tau_per_log_and_method": [round(t, 3) for t in taus],
        "kendall_tau_whole_collection_mean": round(float(np.nanmean(whole)), 4) if whole else None,
        "kendall_tau_other_heldout_metrics": others,
        "models_0.01_better_on_test": len(better), "of_them_passed": sum(g["passed"] for g in better),
        "checkpoints_0.01_better_on_test": len(ahead), "of_them_ahead_on_heldout": int(sum(ahead)),
        "models_0.01_worse_on_test": len(worse), "of_them_refused": sum(not g["passed"] for g in worse),
        "worse_models": "the blue model with Gaussian noise on its query vectors (sd 0.01-0.05, 3 draws each, "
                        "per click log): a worse ranking the gate must refuse",
        "checks": gate_checks, "worse_checks": worse_checks, "margin": config.gate.margin,
        "points": [{method: [[round(float(v), 4) for v in point] for point in points]
                    for method, points in by_method.items()} for by_method in logs]}
    result["propensity"] = propensity_recovery(harness, config, result["default_noise"],
                                               [1000 * s + 13 for s in plan.click_seeds],
                                               plan.propensity_sessions_per_query)
    if plan.skylines:
        result["skylines"] = {"shown_qrels": mean_of([harness.skyline(True, config)]),
                              "all_qrels": mean_of([harness.skyline(False, config)])}
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


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
