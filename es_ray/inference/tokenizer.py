"""Loading a model directory's tokenizer without importing torch.

`AutoTokenizer.from_pretrained` reads the model's config through `AutoConfig`, and transformers'
configuration module imports torch (transformers 5: configuration_utils -> modeling_rope_utils): about
1 s and 300 MB for every process that only tokenises, such as each Ray Data actor of a bulk upsert or a
reindex, which tokenise and send token ids to Triton. The tokenizer class the directory declares in
tokenizer_config.json (`tokenizer_class`, written by every `save_pretrained`) is the class AutoTokenizer
resolves for it; taken from transformers' lazy top-level module it loads without the config and without
torch. A directory that declares no class, or custom code (`auto_map`), goes through AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a model directory, loaded offline (the same class AutoTokenizer picks)."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config_path = Path(model_dir) / "tokenizer_config.json"
    declared = json.loads(config_path.read_text()) if config_path.exists() else {}
    name = declared.get("tokenizer_class")
    tokenizer_class = None
    if name and "auto_map" not in declared:
        try:
            tokenizer_class = getattr(transformers, name)
        except (AttributeError, ImportError):  # a class this transformers does not have: let AutoTokenizer decide
            tokenizer_class = None
    return (tokenizer_class or transformers.AutoTokenizer).from_pretrained(str(model_dir))


def rows_tokenizer(model_dir: str | os.PathLike, max_length: int, pad_multiple: int = 1):
    """texts -> (input_ids, attention_mask), int64 arrays truncated to max_length tokens and padded to the
    longest text (rounded up to a multiple of pad_multiple): what `tokenizer(texts, max_length=...,
    truncation=True, padding=True, pad_to_multiple_of=..., return_tensors="np")` returns, without the work
    transformers does on every such call (it sets the Rust tokenizer's truncation and padding again, then
    builds a BatchEncoding): half of a short query's tokenising, more right after a forward pass has
    filled the caches (BENCHMARKS.md, "The served call's fixed cost"). Truncation and padding are set once
    here, so request threads may share the function: the Rust tokenizer refuses only concurrent changes of
    its settings. A directory without a fast tokenizer, or without a pad token, keeps transformers' own call."""
    import numpy as np

    tokenizer = load_tokenizer(model_dir)
    if not getattr(tokenizer, "is_fast", False) or tokenizer.pad_token_id is None:  # no pad: transformers says why
        def slow(texts: list[str]):
            encoded = tokenizer(texts, max_length=max_length, truncation=True, padding=True,
                                pad_to_multiple_of=pad_multiple, return_tensors="np")
            return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)
        return slow

    from tokenizers import Tokenizer

    rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the original stays transformers'
    rust.encode_special_tokens = tokenizer.split_special_tokens  # the one setting the copy does not carry
    rust.enable_truncation(max_length, direction=tokenizer.truncation_side)
    rust.enable_padding(direction=tokenizer.padding_side, pad_id=tokenizer.pad_token_id,
                        pad_token=tokenizer.pad_token, pad_type_id=tokenizer.pad_token_type_id,
                        pad_to_multiple_of=pad_multiple if pad_multiple > 1 else None)

    def fast(texts: list[str]):
        if not texts:
            return np.zeros((0, 0), dtype=np.int64), np.zeros((0, 0), dtype=np.int64)
        encodings = rust.encode_batch(texts)  # padded: every row has the same length
        return (np.array([e.ids for e in encodings], dtype=np.int64),
                np.array([e.attention_mask for e in encodings], dtype=np.int64))
    return fast
