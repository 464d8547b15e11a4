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


def test_queries_of_different_lengths_share_a_forward_pass(stack, settings):
    """The query encoder's batches are ragged (triton_repo.ragged_batches): queries sent unpadded and at
    once, each of its own length, are merged into fewer forward passes than requests, and each comes
    back with the vector it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    with db.connect(stack.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
    encoder = TritonEncoder.of(stack.triton_grpc_url, "query_encoder", blue, settings)
    assert encoder.query_pad_multiple == 1
    queries = [" ".join(["protein folding"] * k) for k in range(1, 17)]   # 16 lengths: no two shapes alike
    alone = np.concatenate([encoder.embed_queries([q]) for q in queries])

    def counts() -> tuple[int, int]:
        stats = encoder.client.get_inference_statistics(encoder.model_name, encoder.model_version, as_json=True)
        model = stats["model_stats"][0]
        return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))

    # Rounds of 16 requests at once until one was batched: the first request of a round runs alone, and
    # the others queue behind it while it does.
    for _ in range(5):
        inferences, executions = counts()
        with ThreadPoolExecutor(len(queries)) as pool:
            together = np.concatenate(list(pool.map(lambda q: encoder.embed_queries([q]), queries)))
        inferences, executions = (now - before for now, before in zip(counts(), (inferences, executions)))
        assert inferences == len(queries)
        assert np.abs(together - alone).max() < 1e-4
        if executions < inferences:
            break
    assert executions < inferences, "16 queries of 16 lengths sent at once never shared a forward pass"
