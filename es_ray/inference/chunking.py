"""Splitting texts into model-sized chunks of token ids.

The tokenizer's own overflow support does the split (`return_overflowing_tokens` with a `stride`
of overlapping tokens), so chunks are cut exactly at the model's limit and no token is lost between
neighbours. A text longer than `max_chunks` chunks keeps its first `max_chunks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Chunks:
    """Token ids of every chunk of a batch of texts, padded to one width, and the text each came from."""

    input_ids: np.ndarray        # (n_chunks, width) int64
    attention_mask: np.ndarray   # (n_chunks, width) int64
    owner: np.ndarray            # (n_chunks,) index of the text in the batch
    truncated: list[bool]        # per text: were chunks beyond max_chunks dropped?


def split(tokenizer, texts: list[str], max_length: int, overlap: int, max_chunks: int) -> Chunks:
    if not texts:
        empty = np.zeros((0, 1), dtype=np.int64)
        return Chunks(empty, empty, np.zeros(0, dtype=np.int64), [])
    encoded = tokenizer(texts, max_length=max_length, truncation=True, stride=min(overlap, max_length // 2),
                        return_overflowing_tokens=True, padding=True, return_tensors="np")
    owner = np.asarray(encoded["overflow_to_sample_mapping"], dtype=np.int64)
    # Keep the first max_chunks chunks of each text (chunks of one text are consecutive).
    position = np.zeros_like(owner)
    for i in range(1, len(owner)):
        position[i] = position[i - 1] + 1 if owner[i] == owner[i - 1] else 0
    keep = position < max_chunks
    truncated = [bool(((owner == t) & ~keep).any()) for t in range(len(texts))]
    return Chunks(encoded["input_ids"][keep].astype(np.int64), encoded["attention_mask"][keep].astype(np.int64),
                  owner[keep], truncated)


def forward_passes(chunks: Chunks, rows: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """A batch's chunks as the bulk pipelines send them: longest first (similar lengths share a pass and pad
    little), `rows` a pass, each as wide as its longest row. (row indices into `chunks`, input ids, mask)."""
    order = np.argsort(-chunks.attention_mask.sum(axis=1), kind="stable")
    passes = []
    for start in range(0, len(order), rows):
        picked = order[start:start + rows]
        mask = chunks.attention_mask[picked]
        width = int(mask.sum(axis=1).max())
        passes.append((picked, np.ascontiguousarray(chunks.input_ids[picked][:, :width]),
                       np.ascontiguousarray(mask[:, :width])))
    return passes
