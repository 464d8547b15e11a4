"""Triton serves the same embedding as the local model."""

import numpy as np
import torch

from es_ray.inference.encoder import load_encoder
from es_ray.inference.triton_client import TritonEncoder, grpc_address
from es_ray.store import db, blue_green


def test_served_embedding_equals_local_model(stack, settings):
    with db.connect(stack.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
    texts = ["What causes lift on an aircraft wing?", "x",
             "Transcription factors regulate gene expression in eukaryotic cells. " * 30,  # truncated at max_length
             "Ünïcödé тексты и 中文 also embed."]
    for name in ("query_encoder", "item_encoder"):
        client = TritonEncoder(grpc_address(blue, stack.triton_grpc_url), name, blue.model_version, blue.source_dir, blue.max_length)
        served = client.embed_queries(texts)
        with client.tokenizer() as tokenizer:
            encoded = tokenizer(texts, max_length=blue.max_length, truncation=True, padding=True,
                                return_tensors="pt")
        with torch.inference_mode():
            local = load_encoder(blue.source_dir)(encoded["input_ids"], encoded["attention_mask"]).numpy()
        cosine = (served * local).sum(axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(local, axis=1))
        assert served.shape == (4, 384)
        assert cosine.min() > 0.9999, cosine


def test_requests_in_flight_return_every_row_in_order(stack, settings):
    """An item encoder keeps several requests in flight (one per item-encoder instance): the rows come
    back in the order sent, whichever request finished first, as one request at a time returns them."""
    with db.connect(stack.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
    address = grpc_address(blue, stack.triton_grpc_url)
    # lengths that differ per request, so the requests take different times
    texts = [("Transcription factors regulate gene expression. " * (1 + (k * 7) % 23))[:1500] for k in range(23)]
    one, several = (TritonEncoder(address, "item_encoder", blue.model_version, blue.source_dir, blue.max_length,
                                  max_batch_size=4, in_flight=n) for n in (1, 3))
    assert TritonEncoder.of(stack.triton_grpc_url, "item_encoder", blue, settings).in_flight == \
        settings.triton.item_instances
    chunks, in_order = one.embed_chunks(texts, settings.model.chunk_overlap, settings.model.max_chunks)
    _, overlapped = several.embed_chunks(texts, settings.model.chunk_overlap, settings.model.max_chunks)
    assert len(chunks.owner) == len(in_order) == len(overlapped) > 6   # several requests of 4 rows
    assert np.abs(in_order - overlapped).max() < 1e-5
