"""The quality harness's pieces: a BEIR collection with cached item vectors, a query tower, and the
harness that measures a tower, fine-tunes one, adds click memories and trains skylines (bench/quality.py
runs them; its docstring says what is measured and why)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from es_ray.bench.corpus_vectors import CACHE_DIR, collection_vectors
from es_ray.config import LearningSettings, load_settings
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.demo.users import ClickModel, simulate_log
from es_ray.improve.memory import clicked_pair_weights, item_memories, remembered
from es_ray.inference.encoder import load_encoder, load_tokenizer
from es_ray.store.clickstream import LoggedSession, normalise_query
from es_ray.train import gate
from es_ray.train.clicklog import SessionBatch, is_heldout, split_by_query
from es_ray.train.config import FinetuneConfig, GateConfig
from es_ray.train.finetune import ParentModel, prepare
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.learning_guards import evidence_counts, teaching_sessions
from es_ray.train.evaluation import evaluate, per_query
from es_ray.train.propensity import Impressions, Propensities
from es_ray.train.trainer import Hyperparameters, TrainingData, fit, heldout_metrics, heldout_metrics_of, query_vectors

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
                 model_dir: Path, guards: LearningSettings | None = None):
        self.data, self.config, self.memory = dataset, config, memory
        # The learning guards as configured (configs/stack.yaml `learning:`), so the benchmark measures
        # what the stack would learn from the same users.
        self.guards = guards if guards is not None else load_settings().learning
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
        """The simulated users' log as the learners see it: through the learning guards (each simulated
        session is a client of its own, so a pair teaches once min_clients users clicked it)."""
        model = ClickModel.load().with_noise(noise)
        log = simulate_log(self.data.train, self.shown, self.data.train_qrels, model, seed, self.swap_share,
                           self.swap_max_rank)
        return teaching_sessions(log, self.guards).sessions

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
        (`improve.loop.refresh_memories`: the evidence read through the learning guards, pairs weighted
        by the click model's P(relevant) with the configured examination curve); naive: click counts."""
        counts = evidence_counts(sessions, self.guards)
        if debiased:
            weights = clicked_pair_weights(Impressions.from_counts(counts),
                                           Propensities(np.asarray(self.config.debias.examination_prior), "config"))
        else:
            weights = {}
            for query, item, _, _, clicks in counts:
                if clicks:
                    weights[(query, item)] = weights.get((query, item), 0.0) + clicks
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
