"""A replica's query vectors, kept for the most recent query texts (serve.query_cache_entries).

Why keep them: Triton batches a query with whatever else waits in the query encoder's queue (other
searches, the improvement loop's queries), padded to one shape, and the same text's vector then differs in
its last bits (~1e-8) from the one it gets alone: enough to swap a near-tie between page 1 and page 2 of
one query. Kept, every page of a query ranks by one vector; and a repeated query (the head of a search
log, each page after the first) skips Triton. Keyed by blue, so a new model version embeds afresh; bounded
by functools' LRU, which is thread-safe. Anyone can fill it with texts of their own, which only evicts
others' entries: a vector is the model's for its text, whoever asked first.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from es_ray.store.blue_green import Blue


class QueryVectors:
    def __init__(self, embed: Callable[[Blue, str], np.ndarray], entries: int):
        """`embed(blue, text)`: one query's vector from blue's query encoder; `entries`: texts kept (0: none)."""
        self._embed = embed
        self._cached = functools.lru_cache(maxsize=entries)(self._embedded)

    def _embedded(self, blue: Blue, text: str) -> np.ndarray:
        vector = self._embed(blue, text)
        vector.flags.writeable = False  # shared by every search of this text: nobody may change it
        return vector

    def get(self, blue: Blue, text: str) -> np.ndarray:
        return self._cached(blue, text)
