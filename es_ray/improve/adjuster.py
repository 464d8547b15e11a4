"""VectorAdjuster: a few gradient steps on the chunk vectors that a batch of sessions touched.

A batch holds examples of any shape: each example is (query vector, chunk index, kind) where kind is
clicked, skipped (shown above the lowest click but not clicked) or irrelevant (shown in a session the
user marked as irrelevant). The loss, minimised over the touched chunk vectors only:

    clicked:     pull  * (1 - cos(q, v))                      the clicked chunk should match its query
    skipped:     push  * relu(cos(q, v) - cos(q, v_click) + margin)
                                                               ...and rank above what was passed over
                                                               (pairwise, against the session's best click)
    irrelevant:  irrelevant * relu(cos(q, v) - floor)         results nobody wanted move away
    anchor:      anchor * |v - v_model|^2                     stay close to what the model computed, so
                                                               one noisy click cannot move an item far

Why gradient steps and not "v += lr * (q - v)": the pairwise term only moves vectors whose order is
wrong, and the anchor bounds the drift, which keeps test queries (never clicked) from degrading.
Each row's gradient is averaged over the examples touching it (popular items do not take giant
steps), and vectors are re-normalised after every step (the index is cosine). Works on plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLICKED, SKIPPED, IRRELEVANT = 0, 1, 2


@dataclass
class AdjusterConfig:
    learning_rate: float = 0.5
    iterations: int = 10
    pull: float = 1.0
    push: float = 1.0
    margin: float = 0.05
    irrelevant: float = 0.5
    irrelevant_floor: float = 0.2
    anchor: float = 1.0


@dataclass
class Examples:
    """Flat example lists; `session` ties a skipped chunk to its session's clicked chunk."""

    queries: np.ndarray        # (n_examples, dim)
    chunk: np.ndarray          # (n_examples,) index into the vectors being adjusted
    kind: np.ndarray           # (n_examples,) CLICKED / SKIPPED / IRRELEVANT
    best_click: np.ndarray     # (n_examples,) for SKIPPED: index of the example of the session's top click, else -1


class VectorAdjuster:
    def __init__(self, config: AdjusterConfig | None = None):
        self.config = config or AdjusterConfig()

    def get_config_dict(self) -> dict[str, float]:
        return dict(self.config.__dict__)

    def compute_loss(self, vectors: torch.Tensor, anchors: torch.Tensor, ex: Examples) -> torch.Tensor:
        c = self.config
        q = torch.as_tensor(ex.queries, dtype=vectors.dtype)
        chunk = torch.as_tensor(ex.chunk, dtype=torch.long)
        kind = torch.as_tensor(ex.kind, dtype=torch.long)
        cos = F.cosine_similarity(q, vectors[chunk], dim=1)
        loss = vectors.new_zeros(())
        clicked = kind == CLICKED
        if clicked.any():
            loss = loss + c.pull * (1 - cos[clicked]).sum()
        skipped = kind == SKIPPED
        if skipped.any():
            best = torch.as_tensor(ex.best_click, dtype=torch.long)[skipped]
            loss = loss + c.push * F.relu(cos[skipped] - cos[best] + c.margin).sum()
        irrelevant = kind == IRRELEVANT
        if irrelevant.any():
            loss = loss + c.irrelevant * F.relu(cos[irrelevant] - c.irrelevant_floor).sum()
        return loss + c.anchor * ((vectors - anchors) ** 2).sum()

    def adjust(self, vectors: np.ndarray, anchors: np.ndarray, examples: Examples) -> np.ndarray:
        """New (normalised) vectors for `vectors`, anchored at `anchors` (the model's vectors)."""
        if len(examples.kind) == 0:
            return vectors
        v = torch.tensor(vectors, dtype=torch.float32, requires_grad=True)
        a = torch.as_tensor(anchors, dtype=torch.float32)
        # A chunk clicked in 50 sessions gets 50 times the gradient of one clicked once: divide each
        # row's gradient by the examples that touch it so one learning rate is stable for both.
        touches = np.bincount(examples.chunk, minlength=len(vectors)).astype(np.float32)
        skipped = examples.kind == SKIPPED
        np.add.at(touches, examples.chunk[examples.best_click[skipped]], 1)
        scale = torch.as_tensor(np.maximum(touches, 1.0))[:, None]
        optimiser = torch.optim.SGD([v], lr=self.config.learning_rate)
        for _ in range(self.config.iterations):
            optimiser.zero_grad()
            self.compute_loss(v, a, examples).backward()
            v.grad /= scale
            optimiser.step()
            with torch.no_grad():
                v.copy_(F.normalize(v, dim=1))
        return v.detach().numpy()
