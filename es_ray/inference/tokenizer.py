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
