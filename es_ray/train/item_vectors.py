"""The parent model's item vectors, held in memory for training and for exact held-out ranking.

With the query tower fine-tuned (model.towers = query), item vectors do not change: they are read
once from the blue collection (the model's own vectors, before any click adjustment) instead of
being embedded again. An item is scored by its best chunk, as search does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ItemVectors:
    ids: list[str]           # item number -> object id
    chunks: np.ndarray       # (n_chunks, dim) float32, L2-normalised, grouped by item
    owner: np.ndarray        # (n_chunks,) item number of each chunk, non-decreasing

    @classmethod
    def from_chunks(cls, by_item: dict[str, list[tuple[int, np.ndarray]]]) -> "ItemVectors":
        ids = sorted(by_item)
        rows, owner = [], []
        for number, object_id in enumerate(ids):
            for _, vector in sorted(by_item[object_id], key=lambda pv: pv[0]):
                rows.append(np.asarray(vector, dtype=np.float32))
                owner.append(number)
        dim = len(rows[0]) if rows else 0
        return cls(ids, np.stack(rows) if rows else np.zeros((0, dim), np.float32), np.asarray(owner, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def index(self) -> dict[str, int]:
        return {object_id: n for n, object_id in enumerate(self.ids)}

    def item_scores(self, queries: np.ndarray) -> np.ndarray:
        """(n_queries, n_items): cosine of each item's best chunk."""
        chunk_scores = np.asarray(queries, dtype=np.float32) @ self.chunks.T
        starts = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        return np.maximum.reduceat(chunk_scores, starts, axis=1)

    def rank(self, queries: np.ndarray, query_ids: list[str], k: int = 100) -> dict[str, dict[str, float]]:
        """Exact top-k per query as a trec-style run {query id: {object id: score}}."""
        run: dict[str, dict[str, float]] = {}
        for start in range(0, len(query_ids), 256):
            scores = self.item_scores(queries[start:start + 256])
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            for row, qid in enumerate(query_ids[start:start + 256]):
                run[qid] = {self.ids[i]: float(scores[row, i]) for i in top[row]}
        return run

    def best_chunks(self, queries: np.ndarray, object_ids: list[str]) -> np.ndarray:
        """For each (query vector, item) pair, the item's chunk that best matches the query."""
        index = self.index()
        out = np.empty((len(object_ids), self.chunks.shape[1]), dtype=np.float32)
        for row, (q, object_id) in enumerate(zip(queries, object_ids)):
            number = index[object_id]
            lo, hi = np.searchsorted(self.owner, number), np.searchsorted(self.owner, number, side="right")
            candidates = self.chunks[lo:hi]
            out[row] = candidates[int(np.argmax(candidates @ q))]
        return out
