"""A new version of an architecture that is already exported: the earlier ONNX graph with the new weights.

torch's exporter traces the whole model every time (about 10 s of CPU for MiniLM on 2 cores; 45-50 s at
batch priority beside search traffic), although a fine-tune or a variant changes only the weights. The
graph `encoder.export_onnx` writes keeps every weight as an initializer under its parameter's name, and
`export.json` beside a version's model.onnx records the architecture it was traced from (the transformer's
config and the exporter's version). A later tower of the same architecture copies that graph, puts its own
parameters in place of the initializers of the same name, and is kept only if ONNX Runtime then computes
what torch computes on a small batch; anything else falls back to a full export.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from es_ray.inference.encoder import SentenceEncoder

RECORD = "export.json"  # beside model.onnx: {"architecture": digest}
# Config keys that differ between a parent and its fine-tuned copy without changing the graph.
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "architectures"}
_EXPORTER = "torch.onnx.export dynamo, optimize=False"  # what export_onnx writes; a change makes new digests


def architecture(encoder: SentenceEncoder) -> str:
    import torch

    config = {k: v for k, v in encoder.transformer.config.to_dict().items() if k not in _NOT_ARCHITECTURE}
    text = json.dumps({"config": config, "torch": torch.__version__, "exporter": _EXPORTER}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def record(model_path: Path, digest: str) -> None:
    (model_path.parent / RECORD).write_text(json.dumps({"architecture": digest}))


def find_graph(repo: Path, digest: str) -> Path | None:
    """The newest model.onnx in the repository exported from the architecture `digest`."""
    found = []
    for path in repo.glob(f"*/*/{RECORD}"):
        try:
            if json.loads(path.read_text()).get("architecture") == digest and (path.parent / "model.onnx").exists():
                found.append((path.stat().st_mtime, path.parent / "model.onnx"))
        except (OSError, ValueError):
            continue  # a version being written or removed
    return max(found)[1] if found else None


def refit(graph: Path, encoder: SentenceEncoder, path: Path) -> bool:
    """Writes `graph` with `encoder`'s weights to `path`; False (and nothing usable at `path`) when the
    weights do not fit the graph or the result does not compute what the encoder computes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    weights = encoder.state_dict()
    replaced = 0
    for initializer in model.graph.initializer:
        tensor = weights.get(initializer.name)
        if tensor is None:
            continue  # a constant of the graph itself (position ids, shapes)
        if tuple(initializer.dims) != tuple(tensor.shape):
            return False
        initializer.CopyFrom(numpy_helper.from_array(tensor.detach().cpu().numpy(), initializer.name))
        replaced += 1
    if replaced == 0:
        return False
    onnx.save(model, str(path))
    return computes_as_torch(path, encoder)


def computes_as_torch(path: Path, encoder: SentenceEncoder, atol: float = 1e-4) -> bool:
    import numpy as np
    import onnxruntime
    import torch

    from es_ray.inference.encoder import INPUT_NAMES

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 1000, (3, 19), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    served = session.run(None, dict(zip(INPUT_NAMES, (ids.numpy(), mask.numpy()))))[0]
    with torch.inference_mode():
        local = encoder(ids, mask).numpy()
    return served.shape == local.shape and bool(np.allclose(served, local, atol=atol))
