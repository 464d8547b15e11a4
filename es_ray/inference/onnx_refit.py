"""A new version of an architecture that is already exported: the earlier ONNX graph with the new weights.

torch's exporter traces the whole model every time (about 10 s of CPU for MiniLM on 2 cores; 45-50 s at
batch priority beside search traffic), although a fine-tune or a variant changes only the weights. The
graph `encoder.export_onnx` writes keeps every weight as an initializer under its parameter's name, and
`export.json` beside a version's model.onnx records the architecture it was traced from (the transformer's
config and the exporter's version). A later tower of the same architecture copies that graph, puts its own
parameters in place of the initializers of the same name, and is kept only if ONNX Runtime then computes
what torch computes on a small batch; anything else falls back to a full export.

The exported graph reaches each Linear's weight through a Transpose. ONNX Runtime folds those when it
loads the graph, but keeps the weights as stored beside the transposed copies: for MiniLM 32-44 MB more per
session (about 41 MB), with the same vectors and speed (BENCHMARKS.md, "Weights stored as the MatMul reads
them"). `fold_weight_transposes` stores such a weight transposed, as `<parameter>::T`, before any session
loads it: in every export, and in every refit, so a graph exported before it was folded is still taken.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from es_ray.inference.encoder import SentenceEncoder

RECORD = "export.json"  # beside model.onnx: {"architecture": digest}
TRANSPOSED = "::T"      # an initializer <parameter>::T holds that 2-D parameter transposed (no torch name has "::")
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
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    weights = encoder.state_dict()
    replaced = 0
    for initializer in model.graph.initializer:
        transposed = initializer.name.endswith(TRANSPOSED)
        tensor = weights.get(initializer.name.removesuffix(TRANSPOSED))
        if tensor is None:
            continue  # a constant of the graph itself (position ids, shapes)
        array = tensor.detach().cpu().numpy()
        array = np.ascontiguousarray(array.T) if transposed else array
        if tuple(initializer.dims) != array.shape:
            return False
        initializer.CopyFrom(numpy_helper.from_array(array, initializer.name))
        replaced += 1
    if replaced == 0:
        return False
    fold_weight_transposes(model)  # a graph exported before the fold (no ::T yet) is folded now
    onnx.save(model, str(path))
    return computes_as_torch(path, encoder)


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Replaces, in `model`, every Transpose of a 2-D weight (read by nothing else) by the weight stored
    transposed as `<name>::T`, which the Transpose's readers then take; returns how many. A graph with
    subgraphs (If, Loop, Scan) is left as it is: names there are not followed."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0
    initializers = {i.name: i for i in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    renamed = {}  # a folded Transpose's output -> the transposed weight its readers take instead
    for node in list(graph.node):
        weight = initializers.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if (weight is None or len(weight.dims) != 2 or readers[weight.name] != 1 or perm not in ([], [[1, 0]])
                or node.output[0] in outputs):
            continue
        name = weight.name + TRANSPOSED
        graph.initializer.remove(weight)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), name))
        renamed[node.output[0]] = name
        graph.node.remove(node)
    if renamed:
        for reader in graph.node:
            reader.input[:] = [renamed.get(x, x) for x in reader.input]
        for info in [v for v in graph.value_info if v.name in renamed]:
            graph.value_info.remove(info)
    return len(renamed)


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
