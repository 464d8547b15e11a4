"""A tiny randomly initialised BERT encoder (2 layers, hidden 32) with the real model's tokenizer,
saved as a Hugging Face directory: fine-tuning tests run in seconds on it."""

from __future__ import annotations

from pathlib import Path


def tiny_encoder_dir(target: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from es_ray.inference.encoder import default_model_dir, load_tokenizer

    if (target / "config.json").exists():
        return target
    tokenizer = load_tokenizer(default_model_dir())
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target
