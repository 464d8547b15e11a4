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
from typing import Literal


@dataclass(frozen=True)
class Fusion:
    method: Literal["rrf", "weighted"] = "rrf"
    k: float = 60.0
    dense_weight: float = 1.0
    lexical_weight: float = 1.0


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
    if fusion.method == "rrf":
        def contribution(ranks: dict[str, int], _scores: dict[str, float], item: str, weight: float) -> float:
            return weight / (fusion.k + ranks[item]) if item in ranks else 0.0
    else:
        def contribution(_ranks: dict[str, int], scores: dict[str, float], item: str, weight: float) -> float:
            return weight * scores[item] if item in scores else 0.0
    dense_scores, lexical_scores = _normalised(dense), _normalised(lexical)
    fused = [Fused(item, contribution(dense_ranks, dense_scores, item, fusion.dense_weight)
                   + contribution(lexical_ranks, lexical_scores, item, fusion.lexical_weight),
                   dense_ranks.get(item), lexical_ranks.get(item))
             for item in dense_ranks.keys() | lexical_ranks.keys()]
    return sorted(fused, key=lambda f: (-f.score, f.id))


def _normalised(ranking: list[tuple[str, float]]) -> dict[str, float]:
    """Scores min-max scaled to [0, 1] over the list (all 1 where they are all equal)."""
    if not ranking:
        return {}
    low, high = min(s for _, s in ranking), max(s for _, s in ranking)
    span = high - low
    return {item: (score - low) / span if span > 0 else 1.0 for item, score in ranking}
