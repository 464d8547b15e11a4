"""The GPU benchmark's two sides, on the CPU with a tiny encoder: the ingest path's threads return every
chunk's vector in order, the same as one thread and as the encoder over a whole batch at once."""

from __future__ import annotations

import numpy as np
import torch

from es_ray.bench.gpu import ingest_path, measure
from es_ray.config import load_settings
from es_ray.inference.chunking import split
from es_ray.inference.encoder import load_encoder, load_tokenizer
from tests.tiny_model import tiny_encoder_dir

TEXTS = [("wing lift and drag at low speed " * (1 + i % 7)) + f"case {i}" for i in range(23)]


def test_ingest_path_workers_return_each_batchs_chunks_in_order(tmp_path):
    model_dir = tiny_encoder_dir(tmp_path / "tiny")
    model = load_settings().model.model_copy(update={"max_length": 16, "chunk_overlap": 4, "max_chunks": 3})
    encoder, cpu = load_encoder(model_dir), torch.device("cpu")
    _, two = ingest_path(encoder, model_dir, TEXTS, 5, 4, model, 2, cpu)
    _, one = ingest_path(encoder, model_dir, TEXTS, 5, 4, model, 1, cpu)
    chunks = split(load_tokenizer(model_dir), TEXTS, 16, 4, 3)
    with torch.inference_mode():
        whole = encoder(torch.from_numpy(chunks.input_ids), torch.from_numpy(chunks.attention_mask)).numpy()
    assert len(two) == len(whole) > len(TEXTS)  # long texts made several chunks
    np.testing.assert_allclose(two, one, atol=1e-6)
    np.testing.assert_allclose(two, whole, atol=1e-5)


def test_measure_reports_both_sides_and_their_ratios(tmp_path):
    model_dir = tiny_encoder_dir(tmp_path / "tiny")
    settings = load_settings()
    result = measure(model_dir, TEXTS, ["lift at low speed", "drag"], settings, torch.device("cpu"), rounds=1)
    assert result["docs"] == len(TEXTS) and result["queries"] == 2 and result["gpu"] is None
    assert result["workers"] == settings.upsert.encoders
    assert result["max_abs_difference"] < 1e-5
    ratio = result["ingest_docs_per_s"] / result["raw_docs_per_s"]  # each side's best round
    assert abs(result["ingest_ratio"] - ratio) <= 0.01 * ratio + 0.002
    assert result["query_ratio"] > 0 and result["raw_query_p50_ms"] > 0


def test_prepare_writes_the_benchmarks_sample_and_a_half_precision_model(tmp_path):
    from pathlib import Path

    from es_ray.bench.gpu import prepare
    from es_ray.data.corpus import read_corpus

    collection = Path(__file__).parent / "fixtures" / "collection"
    model_dir = tiny_encoder_dir(tmp_path / "tiny")
    prepare(tmp_path / "out", collection, model_dir, docs=5)
    sample = list(read_corpus(tmp_path / "out" / "collection" / "corpus.jsonl"))
    assert len(sample) == 5 and {i["id"] for i in sample} <= {i["id"] for i in read_corpus(collection / "corpus.jsonl")}
    assert (tmp_path / "out" / "collection" / "qrels" / "test.tsv").exists()
    widened = load_encoder(tmp_path / "out" / "model").float()
    original = load_encoder(model_dir)
    for (name, a), (_, b) in zip(widened.state_dict().items(), original.state_dict().items()):
        torch.testing.assert_close(a, b.half().float(), msg=name)  # the same weights, rounded to fp16
