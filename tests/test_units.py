"""Unit tests without the stack: chunking, settings, Triton config, metrics."""

import os

import numpy as np
import pytest

from es_ray.config import TritonSettings, load_settings
from es_ray.inference.chunking import split
from es_ray.inference.encoder import default_model_dir, load_tokenizer
from es_ray.inference.triton_repo import config_pbtxt
from es_ray.train.evaluation import evaluate


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_dir())


def test_short_text_is_one_chunk_and_long_text_several(tokenizer):
    long_text = " ".join(f"word{i}" for i in range(600))
    chunks = split(tokenizer, ["a short text", long_text], max_length=128, overlap=16, max_chunks=16)
    counts = np.bincount(chunks.owner)
    assert counts[0] == 1
    assert counts[1] >= 4  # 600 words are well over 1,000 word pieces
    assert chunks.input_ids.shape[1] <= 128
    assert chunks.truncated == [False, False]


def test_chunks_overlap_and_cover_the_whole_text(tokenizer):
    text = " ".join(f"w{i}" for i in range(300))
    chunks = split(tokenizer, [text], max_length=64, overlap=8, max_chunks=100)
    decoded = [tokenizer.decode(row[mask.astype(bool)], skip_special_tokens=True)
               for row, mask in zip(chunks.input_ids, chunks.attention_mask)]
    assert "w0" in decoded[0].replace(" ", "") and "w299" in decoded[-1].replace(" ", "")
    # neighbours share tokens (the stride)
    first_tail = decoded[0].split()[-2:]
    assert any(t in decoded[1] for t in first_tail)


def test_max_chunks_caps_and_reports_truncation(tokenizer):
    text = " ".join(f"word{i}" for i in range(2000))
    chunks = split(tokenizer, [text, "short"], max_length=64, overlap=0, max_chunks=3)
    assert np.bincount(chunks.owner).tolist() == [3, 1]
    assert chunks.truncated == [True, False]


def test_environment_overrides_yaml(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_RAY_SERVE__PORT", "9123")
    monkeypatch.setenv("ES_RAY_MODEL__MAX_LENGTH", "128")
    settings = load_settings(tmp_path / "state")
    assert settings.serve.port == 9123
    assert settings.model.max_length == 128
    assert settings.state_dir == (tmp_path / "state").resolve()
    assert settings.postgres.hnsw_ef_search == 100  # from configs/stack.yaml


def test_invalid_setting_is_refused(monkeypatch):
    monkeypatch.setenv("ES_RAY_TRITON__BACKEND", "onnx")
    with pytest.raises(ValueError, match="backend"):
        load_settings()


def test_triton_config_for_both_backends():
    python_cfg = config_pbtxt("query_encoder", 384, TritonSettings(backend="python"))
    assert 'backend: "python"' in python_cfg and "dynamic_batching" in python_cfg
    assert "dims: [ 384 ]" in python_cfg and "python_path" in python_cfg
    torch_cfg = config_pbtxt("query_encoder", 384, TritonSettings(backend="pytorch"))
    assert 'backend: "pytorch"' in torch_cfg and "python_path" not in torch_cfg
    # libtorch binds tensors by the <name>__<index> convention: the same names serve both backends
    for name in ("input_ids__0", "attention_mask__1", "embedding__0"):
        assert name in python_cfg and name in torch_cfg


def test_metrics_match_hand_computed_values():
    qrels = {"q1": {"d1": 1}, "q2": {"d9": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.5}, "q2": {"d3": 0.9, "d9": 0.8}}
    scores = evaluate(run, qrels)
    # q1: relevant at rank 1 -> nDCG 1, RR 1; q2: relevant at rank 2 -> nDCG 1/log2(3), RR 0.5
    assert scores["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert scores["mrr@10"] == pytest.approx(0.75)
    assert scores["recall@10"] == pytest.approx(1.0)
    assert scores["queries"] == 2
