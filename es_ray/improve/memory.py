"""Click memories: what the queries that found an item say about it, added to the item's vectors.

An item clicked for "statins lower LDL cholesterol" is about that, whatever its abstract stresses.
The memory of an item is the weighted mean of the vectors of the queries it was clicked for,
each weighted by the click model's P(relevant | clicks and non-clicks) for that (query, item)
pair (`train.examples.PairEvidence`), so noise clicks weigh little and a one-click relevant result
at a low rank counts. Each chunk vector v of the item becomes

    v' = normalise(v + weight * shrink * m),   shrink = W / (W + evidence_half)

with m the normalised memory and W the summed evidence: an item clicked once moves a little, one
clicked by many queries moves up to `weight`. Queries never clicked that resemble the ones that
found the item now find it too; that is the transfer Rocchio-style click memories show (CoRocchio,
arXiv 2204.00718; LADER, arXiv 2304.04590). Works on plain arrays: the improvement loop stores the
result as the item's adjusted vectors (the model's own stay in `original`, so undo restores them)
and a reindex derives it again with the new model's query vectors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from es_ray.train.examples import relevance_posterior
from es_ray.train.propensity import Impressions, Propensities


@dataclass
class Memory:
    vector: np.ndarray     # normalised weighted mean of the query vectors
    evidence: float        # summed weights


def item_memories(query_vectors: dict[str, np.ndarray], evidence: dict[tuple[str, str], float],
                  min_weight: float = 0.0) -> dict[str, Memory]:
    """evidence: (query key, item) -> weight; query_vectors: query key -> vector."""
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = defaultdict(float)
    for (query, item), weight in evidence.items():
        if weight <= min_weight or query not in query_vectors:
            continue
        v = weight * np.asarray(query_vectors[query], dtype=np.float64)
        sums[item] = sums[item] + v if item in sums else v
        totals[item] += weight
    out = {}
    for item, total in sums.items():
        norm = float(np.linalg.norm(total))
        if norm > 0:
            out[item] = Memory((total / norm).astype(np.float32), totals[item])
    return out


def remembered(chunks: np.ndarray, memory: Memory, weight: float, evidence_half: float) -> np.ndarray:
    """An item's chunk vectors (n, dim) with its memory added, re-normalised."""
    shrink = memory.evidence / (memory.evidence + evidence_half) if evidence_half > 0 else 1.0
    moved = np.asarray(chunks, dtype=np.float32) + np.float32(weight * shrink) * memory.vector
    return moved / np.clip(np.linalg.norm(moved, axis=1, keepdims=True), 1e-12, None)


def clicked_pair_weights(impressions: Impressions, propensities: Propensities) -> dict[tuple[str, str], float]:
    """P(relevant | clicks and non-clicks) of every clicked (query, item) pair: the memories' weights."""
    if not impressions.pairs:
        return {}
    posterior, _ = relevance_posterior(impressions, propensities)
    clicks = np.bincount(impressions.pair, impressions.click, len(impressions.pairs))
    return {pair: float(p) for pair, p, n in zip(impressions.pairs, posterior, clicks) if n > 0}
