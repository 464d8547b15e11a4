"""VectorAdjuster: a few gradient steps on the chunk vectors that a batch of sessions touched.

A batch holds examples of any shape: each example is (query vector, chunk index, kind) where kind is
clicked, skipped (shown above the lowest click but not clicked) or irrelevant (shown in a session the
user marked as irrelevant). The loss, minimised over the touched chunk vectors only:

    clicked:     pull  * (1 - cos(q, v))                      the clicked chunk should match its query
    skipped:     push  * relu(cos(q, v) - cos(q, v_click) + margin)
                                                               ...and rank above what was passed over
                                                               (pairwise, against the session's best click)
    irrelevant:  irrelevant * relu(cos(q, v) - floor)         results nobody wanted move away
    anchor:      anchor * |v - v_anchor|^2                    stay close to the shared vector (the model's
                                                               plus click memory), so one noisy click
                                                               cannot move an item far

Why gradient steps and not "v += lr * (q - v)": the pairwise term only moves vectors whose order is
wrong, and the anchor bounds the drift, which keeps test queries (never clicked) from degrading.
Gradients add up over examples, so evidence counts: five clicks move a chunk further than one noise
click; each step is capped at `max_step` so popular chunks stay stable, and vectors are re-normalised
after every step (the index is cosine). Works on plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from es_ray.config import AdjusterSettings

if TYPE_CHECKING:
    import torch

CLICKED, SKIPPED, IRRELEVANT = 0, 1, 2


# The adjuster's settings are the `improve.adjuster` section of configs/stack.yaml.
AdjusterConfig = AdjusterSettings


@dataclass
class Examples:
    """Flat example lists; `session` ties a skipped chunk to its session's clicked chunk."""

    queries: np.ndarray        # (n_examples, dim)
    chunk: np.ndarray          # (n_examples,) index into the vectors being adjusted
    kind: np.ndarray           # (n_examples,) CLICKED / SKIPPED / IRRELEVANT
    best_click: np.ndarray     # (n_examples,) for SKIPPED: index of the example of the session's top click, else -1
    # (n_examples,) how many sessions each example stands for (None: one each). A replay from counted
    # evidence (store/user_evidence.py) weighs an example by its count: the same loss as repeating it.
    weight: np.ndarray | None = None


class VectorAdjuster:
    def __init__(self, config: AdjusterConfig | None = None):
        self.config = config or AdjusterConfig()

    def get_config_dict(self) -> dict[str, float]:
        return self.config.model_dump()

    def compute_loss(self, vectors: torch.Tensor, anchors: torch.Tensor, ex: Examples) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        c = self.config
        q = torch.as_tensor(ex.queries, dtype=vectors.dtype)
        chunk = torch.as_tensor(ex.chunk, dtype=torch.long)
        kind = torch.as_tensor(ex.kind, dtype=torch.long)
        cos = F.cosine_similarity(q, vectors[chunk], dim=1)
        weight = torch.ones_like(cos) if ex.weight is None else torch.as_tensor(ex.weight, dtype=vectors.dtype)
        loss = vectors.new_zeros(())
        clicked = kind == CLICKED
        if clicked.any():
            loss = loss + c.pull * (weight[clicked] * (1 - cos[clicked])).sum()
        skipped = kind == SKIPPED
        if skipped.any():
            best = torch.as_tensor(ex.best_click, dtype=torch.long)[skipped]
            loss = loss + c.push * (weight[skipped] * F.relu(cos[skipped] - cos[best] + c.margin)).sum()
        irrelevant = kind == IRRELEVANT
        if irrelevant.any():
            loss = loss + c.irrelevant * (weight[irrelevant] * F.relu(cos[irrelevant] - c.irrelevant_floor)).sum()
        return loss + c.anchor * ((vectors - anchors) ** 2).sum()

    def adjust(self, vectors: np.ndarray, anchors: np.ndarray, examples: Examples) -> np.ndarray:
        """New (normalised) vectors for `vectors`, anchored at `anchors` (the model's vectors)."""
        if len(examples.kind) == 0:
            return vectors
        # torch is imported here, not with the module: the Serve replica imports this module (its undo
        # route, through improve.loop) and never adjusts, and torch costs it 1.1 s of start and its memory.
        import torch
        import torch.nn.functional as F

        v = torch.tensor(vectors, dtype=torch.float32, requires_grad=True)
        a = torch.as_tensor(anchors, dtype=torch.float32)
        # Evidence adds up: a chunk clicked in 5 sessions moves further than one clicked once (a lone
        # noise click must not count as much as five real ones). `max_step` caps the per-step move so
        # heavily clicked chunks stay stable.
        optimiser = torch.optim.SGD([v], lr=self.config.learning_rate)
        for _ in range(self.config.iterations):
            optimiser.zero_grad()
            self.compute_loss(v, a, examples).backward()
            norms = v.grad.norm(dim=1, keepdim=True).clamp(min=1e-12)
            v.grad *= (self.config.max_step / (self.config.learning_rate * norms)).clamp(max=1.0)
            optimiser.step()
            with torch.no_grad():
                v.copy_(F.normalize(v, dim=1))
        return v.detach().numpy()
