"""A BEIR collection's item vectors, embedded in-process with the system's own chunking, cached on disk.

The quality harness ranks exactly over every item of a collection many times per run; embedding
SciFact once takes about ten minutes on 2 cores, so the vectors are computed once per (corpus,
model, chunking) and kept in a cache file named after a hash of those inputs. The chunks are the
ones the upsert job stores (`inference.chunking.split`, same max_length, overlap and max_chunks) and the
module is the one Triton serves (`SentenceEncoder`), so the cached vectors are the stored ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from es_ray.inference.chunking import split
from es_ray.data.corpus import read_corpus
from es_ray.inference.encoder import load_encoder, load_tokenizer
from es_ray.train.item_vectors import ItemVectors

CACHE_DIR = Path(os.environ.get("ES_RAY_CACHE_DIR", Path.home() / ".cache" / "es-ray"))

# (input ids, attention mask) -> vectors: another runtime of the same model (es_ray/bench/runtimes.py).
Encode = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _fingerprint(corpus: Path, model_dir: Path, max_length: int, overlap: int, max_chunks: int, runtime: str = "") -> str:
    # The corpus by content, not by modification time: a copy of the same collection hits the cache.
    content = hashlib.sha256(corpus.read_bytes()).hexdigest()
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"}) if model_dir.is_dir() else []
    parts = [content, str(model_dir.resolve()),
             *(f"{p.name}:{p.stat().st_size}" for p in weights), str(max_length), str(overlap), str(max_chunks)]
    parts += [runtime] if runtime else []  # eager torch keeps the key it always had
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def embed_texts(model_dir: Path, ids: list[str], texts: list[str], max_length: int, overlap: int,
                max_chunks: int, batch_texts: int = 32, max_rows: int = 32, progress: bool = True,
                encode: Encode | None = None) -> ItemVectors:
    """Every text split into chunks and embedded (by `encode`, else eager torch); longest first so padding
    wastes little."""
    tokenizer = load_tokenizer(model_dir)
    if encode is None:
        model = load_encoder(model_dir)
        encode = lambda ids, mask: model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()  # noqa: E731
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    by_item: dict[str, list[tuple[int, np.ndarray]]] = {}
    bar = tqdm(total=len(texts), desc="embed corpus", unit="doc", disable=not progress)
    with torch.inference_mode():
        for start in range(0, len(order), batch_texts):
            batch = order[start:start + batch_texts]
            chunks = split(tokenizer, [texts[i] for i in batch], max_length, overlap, max_chunks)
            vectors = np.empty((len(chunks.owner), 0), np.float32)
            out = []
            for row in range(0, len(chunks.owner), max_rows):
                mask = chunks.attention_mask[row:row + max_rows]
                width = int(mask.sum(axis=1).max())
                out.append(encode(np.ascontiguousarray(chunks.input_ids[row:row + max_rows, :width]),
                                  np.ascontiguousarray(mask[:, :width])))
            vectors = np.concatenate(out) if out else vectors
            for part, (owner, vector) in enumerate(zip(chunks.owner, vectors)):
                by_item.setdefault(ids[batch[owner]], []).append((part, vector))
            bar.update(len(batch))
    bar.close()
    return ItemVectors.from_chunks(by_item)


def collection_vectors(data: Path, model_dir: Path, max_length: int = 256, overlap: int = 32, max_chunks: int = 16,
                       cache_dir: Path = CACHE_DIR, encode: Encode | None = None, runtime: str = "") -> ItemVectors:
    """The item vectors of `data`/corpus.jsonl, from the cache when the same inputs were embedded before;
    with `encode`, embedded by another runtime named `runtime` (cached apart)."""
    corpus = Path(data) / "corpus.jsonl"
    key = _fingerprint(corpus, Path(model_dir), max_length, overlap, max_chunks, runtime)
    path = Path(cache_dir) / f"vectors-{Path(data).name}-{key}.npz"
    if path.exists():
        saved = np.load(path)
        return ItemVectors(json.loads(str(saved["ids"])), saved["chunks"], saved["owner"])
    items = list(read_corpus(corpus))
    vectors = embed_texts(Path(model_dir), [i["id"] for i in items], [i["text"] for i in items], max_length,
                          overlap, max_chunks, encode=encode)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, ids=json.dumps(vectors.ids), chunks=vectors.chunks, owner=vectors.owner)
    tmp.replace(path)
    return vectors
