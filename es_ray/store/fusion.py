"""Fusing two rankings of one query (dense and lexical) into one list.

Reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): an item's score is the sum over the
lists it is in of weight / (k + rank). It needs no score calibration (cosine similarities and ts_rank_cd
values live on unrelated scales), and a large k (60 in the paper) keeps one list's top item from
outweighing agreement between the lists. The weighted alternative fuses scores instead: each list's scores
min-max normalised over its candidates to [0, 1], then weight times score summed (an absent item counts
0 in that list); it keeps how far apart items are within a list, which ranks throw away.

Ties are broken by item id, so a query's fused ranking is one fixed order and its pages never overlap.
Plain Python on lists: testable without Postgres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from es_ray.config import SearchSettings


@dataclass(frozen=True)
class Fusion:
    method: Literal["rrf", "weighted"] = "rrf"
    k: float = 60.0
    dense_weight: float = 1.0
    lexical_weight: float = 1.0

    @classmethod
    def configured(cls, search: "SearchSettings") -> "Fusion":
        """The fusion configs/stack.yaml's search section names: what serves until a learned one is promoted."""
        return cls(search.fusion, search.rrf_k, search.dense_weight, search.lexical_weight)

    def label(self) -> str:
        """What a client sees of it (SearchResponse.fusion): method and parameters, e.g. 'rrf k=60 dense=1
        lexical=0.5'; weighted fusion has no k."""
        k = f" k={self.k:g}" if self.method == "rrf" else ""
        return f"{self.method}{k} dense={self.dense_weight:g} lexical={self.lexical_weight:g}"


@dataclass(frozen=True)
class Fused:
    id: str
    score: float
    dense_rank: int | None    # 1-based rank in the dense list; None: not in it
    lexical_rank: int | None


def fuse(dense: list[tuple[str, float]], lexical: list[tuple[str, float]], fusion: Fusion) -> list[Fused]:
    """(id, score) lists, best first, fused into one list, best first."""
    dense_ranks = {item: rank for rank, (item, _) in enumerate(dense, start=1)}
    lexical_ranks = {item: rank for rank, (item, _) in enumerate(lexical, start=1)}
    dense_scores, lexical_scores = _normalised(dense), _normalised(lexical)

    def score(item: str) -> float:
        if fusion.method == "rrf":
            return rrf_score(fusion, dense_ranks.get(item), lexical_ranks.get(item))
        return fusion.dense_weight * dense_scores.get(item, 0.0) + fusion.lexical_weight * lexical_scores.get(item, 0.0)

    fused = [Fused(item, score(item), dense_ranks.get(item), lexical_ranks.get(item))
             for item in dense_ranks.keys() | lexical_ranks.keys()]
    return sorted(fused, key=lambda f: (-f.score, f.id))


def grid(lexical_weights: list[float], ks: list[float], dense_weight: float = 1.0) -> list[Fusion]:
    """The RRF fusions the learner chooses from (search.learned_* in configs/stack.yaml), which search's
    exploration (serve/fusion_exploration.py) also draws from: every (k, lexical weight) pair."""
    return [Fusion("rrf", float(k), dense_weight, float(w)) for k in ks for w in lexical_weights]


def rrf_score(fusion: Fusion, dense_rank: int | None, lexical_rank: int | None) -> float:
    """An item's RRF score from its 1-based rank in each list (None: not in it). The fusion learner
    (train/fusion_weights.py) re-fuses logged results with it from the ranks their sessions recorded."""
    return (fusion.dense_weight / (fusion.k + dense_rank) if dense_rank is not None else 0.0) \
        + (fusion.lexical_weight / (fusion.k + lexical_rank) if lexical_rank is not None else 0.0)


def _normalised(ranking: list[tuple[str, float]]) -> dict[str, float]:
    """Scores min-max scaled to [0, 1] over the list (all 1 where they are all equal)."""
    if not ranking:
        return {}
    low, high = min(s for _, s in ranking), max(s for _, s in ranking)
    span = high - low
    return {item: (score - low) / span if span > 0 else 1.0 for item, score in ranking}
