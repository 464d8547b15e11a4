"""Examination propensities by rank: how likely a user is to look at the result shown at rank r.

Position-based click model (PBM, Craswell et al. 2008):

    P(click at rank r on item d for query q) = theta[r] * gamma[q, d]

Only the ratios theta[r] / theta[1] can be learned from clicks, and only from (query, item) pairs
shown at more than one rank: search swaps one adjacent pair of results in a share of its sessions
(`es_ray.serve.exploration`) so that the log holds such pairs. The estimate is intervention
harvesting (Agarwal et al., "Estimating Position Bias without Intrusive Interventions", WSDM 2019):
for each adjacent pair of ranks (r, r + 1) and every (query, item) pair shown at both, the click
rate at each rank, weighted by n_r * n_r+1 / (n_r + n_r+1) impressions; since the same pairs, with
the same attractiveness, appear on both sides, the ratio of the two weighted sums estimates
theta[r + 1] / theta[r] whatever the items' relevance. Chained, the ratios give theta[r] / theta[1].

Why not EM over all impressions with a free gamma per pair: measured here on simulated logs with
swaps, its maximum-likelihood ratios come out flattened (0.15 to 0.5 too high at low ranks, worse
with more iterations), because a pair seen a handful of times gets a gamma that explains its
clicks by itself. Few swaps give noisy ratios, so each step is shrunk towards the configured prior
by `prior_strength` pseudo-clicks: a small log stays near the prior, a large one overrules it
(bench: `es_ray.bench.quality` reports the recovery from a deliberately wrong prior by log size).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from es_ray.store.clickstream import LoggedSession, normalise_query


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
    """Rows of (query, item) pair, rank, times shown there and clicks there: one row per shown result
    (`from_sessions`, shown = 1) or aggregated counts (`from_counts`, as the click evidence table keeps)."""

    pair: np.ndarray       # (n,) index into `pairs`
    rank: np.ndarray       # (n,) 1-based
    click: np.ndarray      # (n,) clicks
    pairs: list[tuple[str, str]]   # (normalised query, object id)
    shown: np.ndarray | None = None    # (n,) impressions; None: one each

    def __post_init__(self) -> None:
        if self.shown is None:
            self.shown = np.ones(len(self.pair), dtype=np.float64)

    @classmethod
    def from_counts(cls, rows: list[tuple[str, str, int, int, int]]) -> "Impressions":
        """rows: (normalised query, object id, rank, impressions, clicks)."""
        index: dict[tuple[str, str], int] = {}
        pair = [index.setdefault((q, d), len(index)) for q, d, _, _, _ in rows]
        return cls(np.asarray(pair, dtype=np.int64), np.asarray([r[2] for r in rows], dtype=np.int64),
                   np.asarray([r[4] for r in rows], dtype=np.float64), list(index),
                   np.asarray([r[3] for r in rows], dtype=np.float64))

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

    def by_pair_and_rank(self) -> dict[int, dict[int, tuple[int, float]]]:
        """pair -> rank -> (impressions, clicks)."""
        out: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
        for p, r, c, n in zip(self.pair.tolist(), self.rank.tolist(), self.click.tolist(), self.shown.tolist()):
            cell = out[p][r]
            cell[0] += n
            cell[1] += c
        return {p: {r: (int(n), c) for r, (n, c) in ranks.items()} for p, ranks in out.items()}

    def pairs_with_rank_variation(self) -> int:
        return sum(1 for ranks in self.by_pair_and_rank().values() if len(ranks) >= 2)


def harvest_ratios(impressions: Impressions, prior: np.ndarray, prior_strength: float
                   ) -> tuple[np.ndarray, list[int]]:
    """theta[r] / theta[1] for r = 1..len(prior) from pairs shown at adjacent ranks, each step shrunk
    towards the prior's by `prior_strength` pseudo-clicks; also the pairs behind each step."""
    n = len(prior)
    upper, lower, pairs = np.zeros(n - 1), np.zeros(n - 1), [0] * (n - 1)
    for ranks in impressions.by_pair_and_rank().values():
        for r in range(1, n):
            if r in ranks and r + 1 in ranks:
                (n0, c0), (n1, c1) = ranks[r], ranks[r + 1]
                weight = n0 * n1 / (n0 + n1)
                upper[r - 1] += weight * c0 / n0
                lower[r - 1] += weight * c1 / n1
                pairs[r - 1] += 1
    prior_steps = prior[1:] / prior[:-1]
    steps = (lower + prior_strength * prior_steps) / (upper + prior_strength)
    return np.r_[1.0, np.cumprod(steps)], pairs


def propensities(sessions: list[LoggedSession], configured: list[float], mode: str, min_rank_variation: int,
                 prior_strength: float = 50.0) -> Propensities:
    """The configured curve, or the one harvested from pairs shown at two ranks where the log has enough."""
    prior = np.asarray(configured, dtype=np.float64)
    if mode == "config":
        return Propensities(prior, "config", {"reason": "debias.propensity = config"})
    impressions = Impressions.from_sessions(sessions, max_rank=len(prior))
    varied = impressions.pairs_with_rank_variation()
    if varied < min_rank_variation:
        return Propensities(prior, "config", {
            "reason": f"only {varied} (query, item) pairs were shown at more than one rank "
                      f"(need {min_rank_variation}): nothing to estimate examination from",
            "pairs_with_rank_variation": varied})
    ratios, pairs = harvest_ratios(impressions, prior, prior_strength)
    prior_ratios = prior / prior[0]
    return Propensities(np.clip(prior[0] * ratios, 1e-4, 1.0), "estimate", {
        "pairs_with_rank_variation": varied, "pairs_per_step": pairs, "impressions": int(len(impressions.pair)),
        "max_ratio_difference_from_prior": round(float(np.max(np.abs(ratios - prior_ratios))), 4)})
