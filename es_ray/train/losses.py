"""CollectionSoftmaxLoss: each query against every item of the collection, not only the batch.

A batch holds (query vector, positive item, excluded items) examples. The item vectors are the
parent's, frozen and cached (the query tower is what trains), so scoring a query against all of
them costs one (batch x chunks) matrix product. The loss is the cross-entropy of the positive
among all items:

    loss = -log( exp(s(q, d+) * scale) / sum over d not excluded of exp(s(q, d) * scale) )

where s(q, d) is the cosine of d's best chunk (as search scores it). Why not in-batch negatives
(MultipleNegativesRankingLoss): with a frozen item tower they are a random sample of the
collection, nearly all easy; the full softmax sees the items the current query tower actually
confuses with the positive at every step, which is what "dynamic hard negatives" in ADORE (Zhan et
al., "Optimizing Dense Retrieval Model Training with Hard Negatives", SIGIR 2021, arXiv 2104.08051)
mines with an index. Excluded items are left out of the denominator instead of being pushed down:
the query's other positives, and items whose clicks leave their relevance uncertain (RocketQAv2,
arXiv 2110.07367, argues the same for denoised negatives). Soft targets come in as sampling
weights of the examples, so each step stays one positive per row.

`compute_loss_from_scores` takes the (batch, items) score matrix, so it is testable on plain tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def item_scores(queries: torch.Tensor, chunks: torch.Tensor, owner: torch.Tensor, n_items: int) -> torch.Tensor:
    """(batch, n_items): each item's best-chunk cosine, differentiable in `queries`."""
    chunk_scores = queries @ chunks.T
    out = chunk_scores.new_full((queries.shape[0], n_items), float("-inf"))
    return out.scatter_reduce(1, owner.expand(queries.shape[0], -1), chunk_scores, reduce="amax", include_self=True)


class CollectionSoftmaxLoss(nn.Module):
    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def get_config_dict(self) -> dict[str, float]:
        return {"scale": self.scale}

    def compute_loss_from_scores(self, scores: torch.Tensor, positive: torch.Tensor,
                                 excluded: torch.Tensor | None = None) -> torch.Tensor:
        """scores (batch, items); positive (batch,) item index; excluded (batch, items) bool, True where an
        item is neither the positive nor a negative for that row (the positive itself is never excluded)."""
        logits = scores * self.scale
        if excluded is not None:
            keep_positive = F.one_hot(positive, scores.shape[1]).bool()
            logits = logits.masked_fill(excluded & ~keep_positive, float("-inf"))
        return F.cross_entropy(logits, positive)

    def forward(self, queries: torch.Tensor, chunks: torch.Tensor, owner: torch.Tensor, n_items: int,
                positive: torch.Tensor, excluded: torch.Tensor | None = None) -> torch.Tensor:
        return self.compute_loss_from_scores(item_scores(queries, chunks, owner, n_items), positive, excluded)
