"""Examination propensities by rank: how likely a user is to look at the result shown at rank r.

Position-based click model (PBM, Craswell et al. 2008; EM as in Chuklin, Markov and de Rijke,
"Click Models for Web Search", 2015):

    P(click at rank r on item d for query q) = theta[r] * gamma[q, d]

theta (examination) and gamma (attractiveness) are fitted by expectation-maximisation over every
impression of the log, clicked or not. Only the ratios theta[r] / theta[1] are identified, and only
where the same (query, item) pair was shown at more than one rank (new models, improvement steps,
personalisation and new items move results around). Where the log has too few such pairs, the
estimate is not trusted and the configured curve (configs/clicks.yaml) is used instead; the result
says which one was used and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from es_ray.train.clicklog import LoggedSession, normalise_query


@dataclass
class Propensities:
    by_rank: np.ndarray                 # by_rank[r - 1] = examination probability of rank r
    source: str                         # "estimate" or "config"
    details: dict = field(default_factory=dict)

    def at(self, ranks: np.ndarray | list[int]) -> np.ndarray:
        """Propensity of each rank; ranks beyond the curve take its last value."""
        index = np.clip(np.asarray(ranks, dtype=np.int64) - 1, 0, len(self.by_rank) - 1)
        return self.by_rank[index]


@dataclass
class Impressions:
    """One row per shown result: which (query, item) pair, at which rank, clicked or not."""

    pair: np.ndarray       # (n,) index into `pairs`
    rank: np.ndarray       # (n,) 1-based
    click: np.ndarray      # (n,) 0/1
    pairs: list[tuple[str, str]]   # (normalised query, object id)

    @classmethod
    def from_sessions(cls, sessions: list[LoggedSession], max_rank: int) -> "Impressions":
        index: dict[tuple[str, str], int] = {}
        pair, rank, click = [], [], []
        for session in sessions:
            query = normalise_query(session.query)
            for r, item in session.shown:
                if r > max_rank:
                    continue
                key = (query, item)
                pair.append(index.setdefault(key, len(index)))
                rank.append(r)
                click.append(1 if item in session.clicked else 0)
        return cls(np.asarray(pair, dtype=np.int64), np.asarray(rank, dtype=np.int64),
                   np.asarray(click, dtype=np.float64), list(index))

    def pairs_with_rank_variation(self) -> int:
        if len(self.pair) == 0:
            return 0
        distinct = {(p, r) for p, r in zip(self.pair.tolist(), self.rank.tolist())}
        counts = np.bincount(np.fromiter((p for p, _ in distinct), dtype=np.int64), minlength=len(self.pairs))
        return int((counts >= 2).sum())


def estimate_pbm(impressions: Impressions, prior: np.ndarray, iterations: int = 100) -> np.ndarray:
    """EM for the position-based model; returns theta by rank, rescaled so theta[1] equals the prior's."""
    n_ranks = len(prior)
    theta = np.asarray(prior, dtype=np.float64).copy()
    gamma = np.full(len(impressions.pairs), 0.5)
    r, p, c = impressions.rank - 1, impressions.pair, impressions.click
    shown_at = np.bincount(r, minlength=n_ranks).astype(np.float64)
    shown_pair = np.bincount(p, minlength=len(gamma)).astype(np.float64)
    for _ in range(iterations):
        t, g = theta[r], gamma[p]
        denom = np.clip(1 - t * g, 1e-9, None)
        examined = c + (1 - c) * t * (1 - g) / denom        # E[examined | observation]
        attractive = c + (1 - c) * (1 - t) * g / denom      # E[attractive | observation]
        theta = np.where(shown_at > 0, np.bincount(r, examined, n_ranks) / np.maximum(shown_at, 1), theta)
        gamma = np.bincount(p, attractive, len(gamma)) / np.maximum(shown_pair, 1)
        theta, gamma = np.clip(theta, 1e-4, 1.0), np.clip(gamma, 1e-4, 1 - 1e-4)
    return np.clip(theta * (prior[0] / theta[0]), 1e-4, 1.0)


def propensities(sessions: list[LoggedSession], configured: list[float], mode: str,
                 min_rank_variation: int) -> Propensities:
    """The configured curve, or the EM estimate where the log varies ranks enough to identify it."""
    prior = np.asarray(configured, dtype=np.float64)
    if mode == "config":
        return Propensities(prior, "config", {"reason": "debias.propensity = config"})
    impressions = Impressions.from_sessions(sessions, max_rank=len(prior))
    varied = impressions.pairs_with_rank_variation()
    if varied < min_rank_variation:
        return Propensities(prior, "config", {
            "reason": f"only {varied} (query, item) pairs were shown at more than one rank "
                      f"(need {min_rank_variation}): the EM estimate would not be identified",
            "pairs_with_rank_variation": varied})
    estimate = estimate_pbm(impressions, prior)
    return Propensities(estimate, "estimate", {"pairs_with_rank_variation": varied,
                                               "impressions": int(len(impressions.pair))})
