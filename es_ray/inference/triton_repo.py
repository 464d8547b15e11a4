"""The versioned Triton model repository: <repo>/<encoder>_v<N>/config.pbtxt and <N>/model.onnx or model.pt.

Query and item encoders are separate Triton models (they can be scaled and batched differently), and
each registry version N of them is a Triton model of its own (`query_encoder_v3`, version 3), so
loading a new version or unloading an old one never touches the serving one. (Versions of one Triton
model share its load: Triton reloads every version of a model when one is added, and the python
backend can crash tritonserver when that reload replaces instances that are serving requests.)
A version's two model directories hold the same model file (a hard link, so the weights are on disk
once), or two files where a fine-tune trained the query tower alone. The file is the one model.runtime
names: model.onnx (ONNX Runtime: the python backend here, the onnxruntime backend in production) or
model.pt (TorchScript: the python backend here, libtorch in production). config.pbtxt says which.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

from es_ray.config import TritonSettings

if TYPE_CHECKING:
    from torch import nn

QUERY_ENCODER = "query_encoder"
ITEM_ENCODER = "item_encoder"
ENCODERS = (QUERY_ENCODER, ITEM_ENCODER)
SERVED_NAME = re.compile(r"^(?P<encoder>[a-z_]+)_v(?P<version>[0-9]+)$")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}  # model.runtime -> the file Triton loads


def served_name(encoder: str, version: int | str) -> str:
    """The Triton model that serves `encoder` of registry version `version`."""
    return f"{encoder}_v{int(version)}"


def version_dir(repo: Path, encoder: str, version: int | str) -> Path:
    return repo / served_name(encoder, version) / str(int(version))


def deployed_versions(repo: Path) -> dict[str, int]:
    """Triton model name -> registry version, for every complete version directory in the repository."""
    found = {}
    for model_dir in repo.iterdir() if repo.exists() else []:
        match = SERVED_NAME.match(model_dir.name)
        if match and match["encoder"] in ENCODERS and model_file(model_dir / match["version"]) is not None:
            found[model_dir.name] = int(match["version"])
    return found


def model_file(directory: Path) -> Path | None:
    """The model file a version directory holds, whichever runtime wrote it; None while there is none."""
    return next((directory / f for f in MODEL_FILES.values() if (directory / f).exists()), None)


TEMPLATE = Path(__file__).parent / "templates" / "triton_model.py"


def _python_path() -> str:
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return os.pathsep.join(dict.fromkeys(paths))


def bounded_queue(encoder: str) -> bool:
    """Whether the encoder's dynamic-batching queue is bounded (triton.max_queue_size, queue_timeout_s).

    Only the item encoder's. Any queue policy (a size or a timeout) turns off Triton's payload prefetching,
    and without it the dynamic batcher, after an execution, wakes only while the model instance already
    waits for work again (core's dynamic_batch_scheduler.cc, WaitForPayloadSlotAvailable): when the
    instance is not back yet, the wake-up is lost and the batcher sleeps its fixed 500 ms with requests
    queued, unless a new request arrives. At 8 search clients all waiting on queued queries, none arrives:
    searches stalled 0.5 s together (docs/PERFORMANCE.md, "The pause"). The query encoder's requests are
    bounded before Triton (serve.max_ongoing_requests per replica, the driver's passes one at a time, a
    reindex's re-derived query vectors in its workers' batches); a queued query is not timed out by Triton
    either, it waits out the client's triton.timeout_s. The item encoder takes bulk work from many
    workers, where the bound matters and a rare 0.5 s does not."""
    return encoder == ITEM_ENCODER


def ragged_batches(encoder: str, settings: TritonSettings) -> bool:
    """Whether Triton's dynamic batcher may put requests of different lengths in one batch of the encoder
    (allow_ragged_batch on its inputs). Only the query encoder's, and only on the python backend, whose stub
    pads a batch to its longest request itself (templates/triton_model.py, execute): queries are then sent
    at their own length, not padded to model.query_pad_multiple, which on SciFact's test queries meant a
    third more tokens through the model (22.4 tokens on average, 30.1 padded to 16s). A production Triton's
    onnxruntime and pytorch backends take ragged inputs only as 1-D tensors with batch inputs, which the
    exported models do not have: there queries stay padded, so that equal shapes can share a batch. The item
    encoder stays unragged: two bulk requests of 16 rows merged would pad the shorter rows to the longer."""
    return encoder == QUERY_ENCODER and settings.backend == "python"


def instance_count(encoder: str, settings: TritonSettings) -> int:
    """Model instances of the encoder: triton.item_instances for the item encoder, triton.instances for the
    query encoder. Each instance of the python backend is a stub process running the model at
    model.torch_threads threads, so two item-encoder instances of one thread each use two cores for bulk
    work (two requests at once: reindex workers, upsert actors) while no stub ever runs more than one
    thread (configs/stack.yaml)."""
    return settings.item_instances if encoder == ITEM_ENCODER else settings.instances


def config_pbtxt(name: str, dim: int, settings: TritonSettings, torch_threads: int = 0,
                 runtime: str = "torchscript", *, bounded: bool, instances: int | None = None,
                 ragged: bool = False, lone_request_threads: int = 0) -> str:
    """config.pbtxt for one encoder. `python` runs model.py (embedded) on the runtime's file; `pytorch`
    (libtorch) and `onnxruntime` are a production Triton's own backends for model.pt and model.onnx.
    `bounded`: the queue policy below, bounded_queue(encoder): no default, so that no caller puts the
    policy back on the query encoder by leaving it out. `instances`: model instances (default
    triton.instances; instance_count). `ragged`: requests of any length share a batch (ragged_batches).
    `lone_request_threads` (python backend, ONNX Runtime; 0: none): the threads a lone request runs on
    (templates/triton_model.py)."""
    if settings.backend == "python":
        backend = 'backend: "python"'
        instance_kind = "KIND_CPU"
        parameters = (
            f'parameters: {{ key: "python_path" value: {{ string_value: "{_python_path()}" }} }}\n'
            f'parameters: {{ key: "torch_threads" value: {{ string_value: "{torch_threads}" }} }}\n'
            f'parameters: {{ key: "model_filename" value: {{ string_value: "{MODEL_FILES[runtime]}" }} }}\n'
            f'parameters: {{ key: "arena_shrink_above_tokens" value: {{ string_value: '
            f'"{settings.arena_shrink_above_tokens}" }} }}\n'
            f'parameters: {{ key: "arena_shrink_idle_s" value: {{ string_value: "{settings.arena_shrink_idle_s}" }} }}\n'
            f'parameters: {{ key: "lone_request_threads" value: {{ string_value: "{lone_request_threads}" }} }}\n'
        )
    else:
        backend = f'backend: "{settings.backend}"\ndefault_model_filename: "{MODEL_FILES[runtime]}"'
        instance_kind = "KIND_AUTO"
        parameters = ""
    policy = f"""
  default_queue_policy {{
    max_queue_size: {settings.max_queue_size}
    default_timeout_microseconds: {int(settings.queue_timeout_s * 1_000_000)}
    timeout_action: REJECT
  }}""" if bounded else ""
    any_length = " allow_ragged_batch: true" if ragged else ""
    return f"""name: "{name}"
{backend}
max_batch_size: {settings.max_batch_size}
version_policy: {{ all {{ }} }}
input [
  {{ name: "input_ids__0" data_type: TYPE_INT64 dims: [ -1 ]{any_length} }},
  {{ name: "attention_mask__1" data_type: TYPE_INT64 dims: [ -1 ]{any_length} }}
]
output [
  {{ name: "embedding__0" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {settings.max_queue_delay_us}{policy}
}}
instance_group [ {{ kind: {instance_kind} count: {instances or settings.instances} }} ]
{parameters}"""


def encoder_config(encoder: str, version: int, dim: int, settings: TritonSettings, torch_threads: int,
                   runtime: str, lone_query_threads: int = 0) -> str:
    """config.pbtxt of one encoder of a version, with that encoder's queue bound, instances, batching and
    threads (lone_query_threads: what the query encoder's lone requests run on, templates/triton_model.py)."""
    return config_pbtxt(served_name(encoder, version), dim, settings, torch_threads, runtime,
                        bounded=bounded_queue(encoder), instances=instance_count(encoder, settings),
                        ragged=ragged_batches(encoder, settings),
                        lone_request_threads=lone_query_threads if encoder == QUERY_ENCODER else 0)


def save_model(module: nn.Module, path: Path, runtime: str, graph: Path | None = None) -> str:
    """The encoder as `runtime`'s file: exported to ONNX (or `graph`, an earlier export of the same
    architecture, with this encoder's weights: onnx_refit.py), or traced to TorchScript (a TorchScript
    module as is). Returns how, for the deploy's log: "exported", "refit from <model>/<version>", ...
    torch is imported here, not with the module: the clients that only read names from it (every Ray Data
    actor that sends token ids to Triton) start without it."""
    import torch

    from es_ray.inference import onnx_refit
    from es_ray.inference.encoder import export_onnx, trace

    if runtime != "onnx":
        torch.jit.save(module if isinstance(module, torch.jit.ScriptModule) else trace(module), str(path))
        return "traced"
    how = "exported"
    if graph is not None:
        source = f"{graph.parent.parent.name}/{graph.parent.name}"
        try:
            if onnx_refit.refit(graph, module, path):
                return f"refit from {source}"
            why = "its weights did not fit"
        except Exception as error:  # noqa: BLE001 - a graph removed meanwhile, or one that cannot be read
            why = f"{type(error).__name__}: {error}"[:200]
        how = f"exported (the graph of {source} was not taken: {why})"
    export_onnx(module, path)
    return how


def write_version(repo: Path, version: int, towers: dict[str, nn.Module], dim: int,
                  settings: TritonSettings, torch_threads: int = 0, runtime: str = "torchscript",
                  lone_query_threads: int = 0) -> dict[str, str]:
    """Writes both encoders' entries for `version` from {model name: encoder module} as `runtime`'s file;
    a module shared by both is saved once and hard-linked. Returns {Triton model name: how its file was made}."""
    from es_ray.inference import onnx_refit

    saved: dict[int, Path] = {}
    made: dict[str, str] = {}
    for name in ENCODERS:
        directory = version_dir(repo, name, version)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / MODEL_FILES[runtime]
        tmp = directory / f"{MODEL_FILES[runtime]}.tmp"
        tmp.unlink(missing_ok=True)
        module = towers[name]
        digest = onnx_refit.architecture(module) if runtime == "onnx" else None
        if id(module) in saved:
            try:
                os.link(saved[id(module)], tmp)
            except OSError:
                shutil.copy(saved[id(module)], tmp)
            how = "linked"
        else:
            how = save_model(module, tmp, runtime, onnx_refit.find_graph(repo, digest) if digest else None)
        tmp.replace(target)
        if digest:  # what a later version of this architecture can take the graph from
            onnx_refit.record(target, digest)
        saved.setdefault(id(module), target)
        made[served_name(name, version)] = how
        shutil.copy(TEMPLATE, directory / "model.py")
        _write_if_changed(directory.parent / "config.pbtxt",
                          encoder_config(name, version, dim, settings, torch_threads, runtime, lone_query_threads))
    return made


def refresh_version(repo: Path, version: int, dim: int, settings: TritonSettings, torch_threads: int,
                    lone_query_threads: int = 0) -> None:
    """A version already in the repository gets this es-ray's model.py and config.pbtxt (queue bounds,
    threads, ...) for the model file it holds; Triton reads them at its next load of the version."""
    for name in ENCODERS:
        directory = version_dir(repo, name, version)
        runtime = next(r for r, f in MODEL_FILES.items() if f == model_file(directory).name)
        shutil.copy(TEMPLATE, directory / "model.py")
        _write_if_changed(directory.parent / "config.pbtxt",
                          encoder_config(name, version, dim, settings, torch_threads, runtime, lone_query_threads))


def _write_if_changed(path: Path, text: str) -> None:
    """Writes the file whole (rename), and only when its text changes: a model's config is not touched
    again once Triton has loaded it."""
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)


def has_version(repo: Path, version: int) -> bool:
    return all(model_file(version_dir(repo, name, version)) is not None for name in ENCODERS)


def remove_version(repo: Path, version: int) -> None:
    for name in ENCODERS:
        shutil.rmtree(repo / served_name(name, version), ignore_errors=True)
