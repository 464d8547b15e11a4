"""Averaging the fine-tuned weights with the parent's (WiSE-FT).

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022, arXiv 2109.01903): the linear
interpolation (1 - a) * parent + a * fine-tuned keeps most of what fine-tuning gained on the
training distribution and much of what the parent knew elsewhere, often beating both on data that
neither trained on. Here "elsewhere" is the queries nobody has clicked: the fine-tune sees only
clicked ones, and a tower pulled all the way towards them forgets how to read the others.
"""

from __future__ import annotations

import torch


def interpolate(parent: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], tuned_weight: float
                ) -> dict[str, torch.Tensor]:
    """State dict (1 - tuned_weight) * parent + tuned_weight * tuned; integer buffers come from `tuned`."""
    if not 0.0 <= tuned_weight <= 1.0:
        raise ValueError(f"tuned_weight must be in [0, 1], got {tuned_weight}")
    if parent.keys() != tuned.keys():
        raise ValueError("the two state dicts hold different parameters")
    return {name: torch.lerp(parent[name], value, tuned_weight) if value.is_floating_point() else value.clone()
            for name, value in tuned.items()}
