"""Training examples from clicks: (query, clicked item, hard negative, sampling weight), and held-out labels.

Three ways to turn clicks into examples (`debias.enabled` / `debias.method` in configs/finetune.yaml):

- naive: every click is one positive example. Results at the top are examined more, so they are
  clicked more, and the model is mostly taught what it already ranks first; noise clicks count fully.
- ips: every click weighted by 1 / propensity(rank), clipped (Joachims et al., "Unbiased
  Learning-to-Rank with Biased Feedback", 2017). Unbiased in expectation, but at low ranks noise
  clicks outnumber relevant ones and get the largest weights (measured worse here: DESIGN.md).
- posterior (default): clicks are aggregated per (query, item) over all its impressions, and a
  two-class position-based click model is fitted by EM: an examined result is clicked with
  probability gamma1 if relevant and gamma0 if not, examination comes from the propensities.
  Each pair gets P(relevant | its clicks and non-clicks at their ranks); pairs above
  `positive_threshold` become one example each, sampled in proportion to that probability. This
  corrects position bias (a click at rank 8, examined 20% of the time, is strong evidence; a lone
  click at rank 1 among five impressions is not) and filters noise clicks instead of amplifying them.

Hard negatives are the results shown above a click and skipped ("skipped above"), and everything
shown in a session marked irrelevant, never an item the click model believes relevant. The loss
(MultipleNegativesRankingLoss) adds in-batch negatives; weights act by sampling, so the loss stays
the library's own.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from es_ray.train.clicklog import LoggedSession, normalise_query
from es_ray.train.config import DebiasConfig
from es_ray.train.propensity import Impressions, Propensities


@dataclass
class TrainingExamples:
    queries: list[str]
    positives: list[str]
    negatives: list[str | None]      # None: no mined negative; a random corpus item stands in
    weights: np.ndarray              # sampling weights, mean 1
    details: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)


def relevance_posterior(impressions: Impressions, propensities: Propensities, iterations: int = 50
                        ) -> tuple[np.ndarray, dict[str, float]]:
    """P(relevant) per (query, item) pair under a two-class PBM with known examination; EM-fitted
    click probabilities gamma1 > gamma0 and a prior of relevance by the pair's best rank."""
    p, c = impressions.pair, impressions.click
    t = propensities.at(impressions.rank)
    n_pairs = len(impressions.pairs)
    best_rank = np.full(n_pairs, 10**9)
    np.minimum.at(best_rank, p, impressions.rank)
    bucket = np.clip(best_rank - 1, 0, len(propensities.by_rank) - 1)
    n_buckets = len(propensities.by_rank)
    gamma1, gamma0, prior = 0.8, 0.05, np.full(n_buckets, 0.1)
    posterior = np.zeros(n_pairs)
    for _ in range(iterations):
        def loglik(g: float) -> np.ndarray:
            q = np.clip(t * g, 1e-9, 1 - 1e-9)
            return np.bincount(p, c * np.log(q) + (1 - c) * np.log(1 - q), n_pairs)

        logit_prior = np.log(prior[bucket]) - np.log1p(-prior[bucket])
        posterior = 1 / (1 + np.exp(-(loglik(gamma1) - loglik(gamma0) + logit_prior)))
        w1 = posterior[p]

        def refit(g: float, w: np.ndarray) -> float:
            examined = c + (1 - c) * t * (1 - g) / np.clip(1 - t * g, 1e-9, None)
            return float(np.clip((w * c).sum() / max((w * examined).sum(), 1e-9), 1e-4, 1 - 1e-4))

        gamma1, gamma0 = refit(gamma1, w1), refit(gamma0, 1 - w1)
        if gamma1 < gamma0:  # keep class 1 the relevant one
            gamma1, gamma0, posterior = gamma0, gamma1, 1 - posterior
        counts = np.bincount(bucket, minlength=n_buckets)
        prior = (np.bincount(bucket, posterior, n_buckets) + 1) / (counts + 2)
        prior = np.clip(prior, 1e-3, 1 - 1e-3)
    return posterior, {"gamma_relevant": round(gamma1, 4), "gamma_noise": round(gamma0, 4)}


def _negative_pools(sessions: list[LoggedSession]) -> dict[str, set[str]]:
    """Per normalised query: items skipped above a click or shown in a session marked irrelevant."""
    pools: dict[str, set[str]] = defaultdict(set)
    for s in sessions:
        query = normalise_query(s.query)
        pools[query].update(s.skipped_above())
        if s.irrelevant and not s.clicked:
            pools[query].update(item for _, item in s.shown)
    return pools


def build_examples(sessions: list[LoggedSession], propensities: Propensities, config: DebiasConfig,
                   seed: int = 7) -> TrainingExamples:
    rng = random.Random(seed)
    pools = _negative_pools(sessions)
    text_of = {}
    for s in sessions:
        text_of.setdefault(normalise_query(s.query), s.query)
    queries, positives, negatives, weights = [], [], [], []
    details: dict = {"clicks": sum(len(s.clicked) for s in sessions),
                     "method": config.method if config.enabled else "naive"}

    if config.enabled and config.method == "posterior":
        impressions = Impressions.from_sessions(sessions, max_rank=10**6)
        posterior, fitted = relevance_posterior(impressions, propensities)
        details.update(fitted)
        clicked_pairs = {(normalise_query(s.query), i) for s in sessions for i in s.clicked}
        # A positive needs a click of its own: a pair never clicked has nothing but the prior for it.
        relevant = {pair for pair, prob in zip(impressions.pairs, posterior)
                    if prob >= config.positive_threshold and pair in clicked_pairs}
        details.update({"pairs": len(impressions.pairs), "clicked_pairs": len(clicked_pairs),
                        "positive_pairs": len(relevant)})
        for (query, item), prob in zip(impressions.pairs, posterior):
            if (query, item) not in relevant:
                continue
            pool = sorted(n for n in pools.get(query, ()) if (query, n) not in relevant)
            # One example per mined negative (up to max_negatives), sharing the pair's weight: training
            # draws a pair many times and should meet its different negatives, not one fixed one.
            chosen = rng.sample(pool, min(len(pool), config.max_negatives)) if pool else [None]
            for negative in chosen:
                queries.append(text_of[query]), positives.append(item)
                negatives.append(negative), weights.append(prob / len(chosen))
    else:
        for s in sessions:
            query = normalise_query(s.query)
            skipped = s.skipped_above()
            for rank, item in s.shown:
                if item not in s.clicked:
                    continue
                pool = skipped or sorted(pools.get(query, set()) - s.clicked)
                weight = 1.0
                if config.enabled:  # ips
                    weight = min(1.0 / float(propensities.at([rank])[0]), config.ips_clip)
                queries.append(s.query), positives.append(item)
                negatives.append(rng.choice(pool) if pool else None), weights.append(weight)
    w = np.asarray(weights, dtype=np.float64)
    if len(w):
        w = w / w.mean()
    details["examples"] = len(queries)
    details["with_mined_negative"] = sum(n is not None for n in negatives)
    return TrainingExamples(queries, positives, negatives, w, details)


@dataclass
class HeldOut:
    """Held-out queries, graded labels and what each query was shown; the same labels judge every model
    (and both training modes), so their scores compare."""

    queries: dict[str, str]                 # normalised query -> text
    qrels: dict[str, dict[str, int]]        # normalised query -> {clicked item: grade 1..10}
    judged: dict[str, set[str]]             # normalised query -> items shown for it


def heldout_labels(sessions: list[LoggedSession], propensities: Propensities) -> HeldOut:
    """Labels from held-out clicks, corrected for position: an item's grade is its click-through rate
    per expected examination, clicks / sum of propensity(rank) over its impressions (capped at 1,
    times 10). Raw clicks would favour the model that logged them: what it ranked first was examined,
    so clicked, more often, and any other order would look worse. A click at rank 8 (examined one
    time in five) counts for about four at rank 1."""
    queries: dict[str, str] = {}
    clicks: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    examined: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in sessions:
        qid = normalise_query(s.query)
        for rank, item in s.shown:
            examined[qid][item] += float(propensities.at([rank])[0])
            if item in s.clicked:
                clicks[qid][item] += 1
                queries.setdefault(qid, s.query)
    qrels = {q: {item: max(1, round(10 * min(1.0, n / examined[q][item]))) for item, n in clicks[q].items()}
             for q in queries}
    return HeldOut(queries, qrels, {q: set(examined[q]) for q in queries})
