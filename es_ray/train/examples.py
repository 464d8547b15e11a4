"""Training examples from clicks, and held-out labels, both through one click model.

An example is (query, item it should rank first, sampling weight); per query, a set of items left
out of the softmax denominator (`losses.CollectionSoftmaxLoss`), because the log cannot say whether
they are relevant. Three ways to turn clicks into examples (`debias` in configs/finetune.yaml):

- naive (`enabled: false`): every click is one example of weight 1. Results at the top are examined
  more, so clicked more: the model is mostly taught what it already ranks first, and noise clicks
  count fully.
- ips: every click weighted by 1 / propensity(rank), clipped (Joachims et al., "Unbiased
  Learning-to-Rank with Biased Feedback", 2017). Unbiased in expectation, but at low ranks noise
  clicks outnumber relevant ones and get the largest weights (measured worse here: DESIGN.md).
- posterior (default): clicks and non-clicks are aggregated per (query, item) over all impressions
  and a two-class position-based click model is fitted by EM: an examined result is clicked with
  probability gamma1 if relevant and gamma0 if not (the noise floor: Vardasbi et al., "Cascade
  Model-based Propensity Estimation for Counterfactual LTR", 2020, arXiv 2008.10242, correct noise
  with the same affine form), examination comes from the propensities. Each clicked pair gets
  P(relevant | its clicks and non-clicks at their ranks) and becomes one example weighted by it:
  a lone click at rank 8 (examined one time in five) is strong evidence, a lone click at rank 1
  among five impressions is not. Items whose relevance stays uncertain are excluded from their
  query's denominator instead of being pushed down as negatives: clicked pairs below
  `min_posterior`, and shown, never-clicked items above `uncertain_posterior` (a relevant result
  at rank 8 goes unclicked in five sessions more than a third of the time).

In every method a query's clicked items are excluded from each other's denominators (one click
is not evidence against another).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from es_ray.store.clickstream import LoggedSession, normalise_query
from es_ray.train.config import DebiasConfig
from es_ray.train.propensity import Impressions, Propensities


@dataclass
class TrainingExamples:
    queries: list[str]                   # query text of each example
    positives: list[str]                 # the item each example should rank first
    weights: np.ndarray                  # sampling weights, mean 1
    excluded: dict[str, set[str]]        # per query text: items neither positive nor negative for it
    details: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)


def relevance_posterior(impressions: Impressions, propensities: Propensities, iterations: int = 50
                        ) -> tuple[np.ndarray, dict[str, float]]:
    """P(relevant) per (query, item) pair under a two-class PBM with known examination; EM-fitted
    click probabilities gamma1 > gamma0 and a prior of relevance by the pair's best rank."""
    p, c, n = impressions.pair, impressions.click, impressions.shown
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
            return np.bincount(p, c * np.log(q) + (n - c) * np.log(1 - q), n_pairs)

        logit_prior = np.log(prior[bucket]) - np.log1p(-prior[bucket])
        posterior = 1 / (1 + np.exp(-(loglik(gamma1) - loglik(gamma0) + logit_prior)))
        w1 = posterior[p]

        def refit(g: float, w: np.ndarray) -> float:
            examined = c + (n - c) * t * (1 - g) / np.clip(1 - t * g, 1e-9, None)
            return float(np.clip((w * c).sum() / max((w * examined).sum(), 1e-9), 1e-4, 1 - 1e-4))

        gamma1, gamma0 = refit(gamma1, w1), refit(gamma0, 1 - w1)
        if gamma1 < gamma0:  # keep class 1 the relevant one
            gamma1, gamma0, posterior = gamma0, gamma1, 1 - posterior
        counts = np.bincount(bucket, minlength=n_buckets)
        prior = (np.bincount(bucket, posterior, n_buckets) + 1) / (counts + 2)
        prior = np.clip(prior, 1e-3, 1 - 1e-3)
    return posterior, {"gamma_relevant": round(gamma1, 4), "gamma_noise": round(gamma0, 4)}


@dataclass
class PairEvidence:
    """What the log says about each (normalised query, item) pair it showed."""

    posterior: dict[tuple[str, str], float]      # P(relevant | clicks and non-clicks)
    clicks: dict[tuple[str, str], int]
    fitted: dict[str, float]

    @classmethod
    def from_sessions(cls, sessions: list[LoggedSession], propensities: Propensities) -> "PairEvidence":
        impressions = Impressions.from_sessions(sessions, max_rank=10**6)
        if not impressions.pairs:
            return cls({}, {}, {})
        posterior, fitted = relevance_posterior(impressions, propensities)
        clicks = np.bincount(impressions.pair, impressions.click, len(impressions.pairs))
        return cls({pair: float(p) for pair, p in zip(impressions.pairs, posterior)},
                   {pair: int(n) for pair, n in zip(impressions.pairs, clicks) if n > 0}, fitted)


def build_examples(sessions: list[LoggedSession], propensities: Propensities, config: DebiasConfig
                   ) -> TrainingExamples:
    text_of: dict[str, str] = {}
    clicked_by_query: dict[str, set[str]] = defaultdict(set)
    for s in sessions:
        text_of.setdefault(normalise_query(s.query), s.query)
        clicked_by_query[normalise_query(s.query)] |= s.clicked
    excluded = {text_of[q]: set(items) for q, items in clicked_by_query.items() if items}
    queries, positives, weights = [], [], []
    method = config.method if config.enabled else "naive"
    details: dict = {"clicks": sum(len(s.clicked) for s in sessions), "method": method}

    if method == "posterior":
        evidence = PairEvidence.from_sessions(sessions, propensities)
        details.update(evidence.fitted)
        uncertain = 0
        for (query, item), prob in sorted(evidence.posterior.items()):
            if (query, item) in evidence.clicks:
                if prob >= config.min_posterior:
                    queries.append(text_of[query]), positives.append(item), weights.append(prob)
            elif prob >= config.uncertain_posterior:
                excluded.setdefault(text_of[query], set()).add(item)
                uncertain += 1
        details.update({"pairs": len(evidence.posterior), "clicked_pairs": len(evidence.clicks),
                        "positive_pairs": len(queries), "uncertain_unclicked": uncertain})
    else:
        for s in sessions:
            for rank, item in s.shown:
                if item in s.clicked:
                    weight = 1.0 if method == "naive" else min(1.0 / float(propensities.at([rank])[0]),
                                                               config.ips_clip)
                    queries.append(text_of[normalise_query(s.query)]), positives.append(item), weights.append(weight)
    w = np.asarray(weights, dtype=np.float64)
    if len(w):
        w = w / w.mean()
    details["examples"] = len(queries)
    return TrainingExamples(queries, positives, w, excluded, details)


@dataclass
class HeldOut:
    """Held-out queries, graded labels and what each query was shown; the same labels judge every model
    (and both training modes), so their scores compare."""

    queries: dict[str, str]                 # normalised query -> text
    qrels: dict[str, dict[str, int]]        # normalised query -> {item: grade 1..10}
    shown: dict[str, set[str]]              # normalised query -> items its sessions showed


def heldout_labels(sessions: list[LoggedSession], propensities: Propensities, binary_at: float | None = None,
                   click_model: bool = True) -> HeldOut:
    """Labels from held-out clicks: a clicked item's grade is 10 x P(relevant | its clicks and non-clicks
    at their ranks), from the same click model as the training posterior, rounded; grade 0 is no label.
    With `binary_at` (the fine-tune's default, `debias.heldout_relevant_at`), grade 1 where P(relevant)
    >= binary_at instead: how sure the log is about an item (more sure at the top, where users look)
    then does not pass for how relevant it is. Graded labels favour the blue model's order, which put
    the surest items first: in the quality harness they put 19 of 63 Cranfield checkpoints that were
    0.01 better on the test qrels ahead of blue, binary labels 35; both refused all 15 SciFact models
    made worse.
    Click-through rate per examination (the earlier labels) gave a lone noise click at rank 9 the top
    grade; here it gets the evidence it carries, and one click among five impressions at rank 1 (which
    users examine four times in five) almost none. Without `click_model` (debiasing switched off) every
    clicked item is grade 1: the labels then assume what that training assumes."""
    evidence = PairEvidence.from_sessions(sessions, propensities)
    text_of: dict[str, str] = {}
    shown: dict[str, set[str]] = defaultdict(set)
    for s in sessions:
        text_of.setdefault(normalise_query(s.query), s.query)
        shown[normalise_query(s.query)].update(item for _, item in s.shown)
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    for (query, item) in evidence.clicks:
        p = evidence.posterior[(query, item)]
        if not click_model:
            grade = 1
        elif binary_at is not None:
            grade = int(p >= binary_at)
        else:
            grade = int(round(10 * p))
        if grade > 0:
            qrels[query][item] = grade
    return HeldOut({q: text_of[q] for q in qrels}, dict(qrels), {q: shown[q] for q in qrels})
