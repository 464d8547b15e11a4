"""Randomised swaps of one adjacent pair of results: the interventions that let the click log reveal
how much attention each rank gets.

Whether users look at rank r, and how much less than at rank 1, is not known in production (the
configured curve comes from another engine's log). Clicks alone cannot separate "shown low" from
"less relevant" while every query always gets the same ranking. Swapping two neighbours at random
in a small share of sessions shows the same (query, item) pair at two ranks with nothing else
changed, which is what identifies the position-based model's examination curve (Joachims, Swaminathan
and Schnabel, "Unbiased Learning-to-Rank with Biased Feedback", WSDM 2017, the "swap intervention";
Wang et al., "Position Bias Estimation for Unbiased Learning to Rank in Personal Search", WSDM 2018).
A swap costs the user little (a neighbour, near-equal in score) and is recorded with the session.
Personalised searches are never swapped: a user's own ranking is what they asked for.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def choose_swap(n_results: int, share: float, max_rank: int, rng: random.Random) -> int | None:
    """With probability `share`, the 1-based upper rank r of a pair (r, r + 1) within the first
    `max_rank` results, uniformly; None otherwise or when fewer than two results are in reach."""
    reach = min(n_results, max_rank)
    if reach < 2 or rng.random() >= share:
        return None
    return rng.randint(1, reach - 1)


def swapped(results: Sequence[T], upper_rank: int | None) -> list[T]:
    """The results with ranks `upper_rank` and `upper_rank + 1` exchanged (a copy)."""
    out = list(results)
    if upper_rank is not None:
        out[upper_rank - 1], out[upper_rank] = out[upper_rank], out[upper_rank - 1]
    return out
