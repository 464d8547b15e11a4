"""The versioned Triton model repository: <repo>/<model name>/config.pbtxt and <version>/model.pt.

Query and item encoders are separate Triton models (they can be scaled and batched differently).
Their version directories hold the same TorchScript file (a hard link, so the weights are on disk
once), or two files where a fine-tune trained the query tower alone.
Triton versions are the MLflow registry versions, so `query_encoder` version 3 is registry version 3.
"""

from __future__ import annotations

import os
import shutil
import site
import sysconfig
from pathlib import Path

import torch

from es_ray.config import TritonSettings

QUERY_ENCODER = "query_encoder"
ITEM_ENCODER = "item_encoder"
ENCODERS = (QUERY_ENCODER, ITEM_ENCODER)
TEMPLATE = Path(__file__).parent / "templates" / "triton_model.py"


def _python_path() -> str:
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return os.pathsep.join(dict.fromkeys(paths))


def config_pbtxt(name: str, dim: int, settings: TritonSettings, torch_threads: int = 0) -> str:
    """config.pbtxt for one encoder. `python` runs model.py (embedded); `pytorch` is libtorch (production)."""
    if settings.backend == "python":
        backend = 'backend: "python"'
        instance_kind = "KIND_CPU"
        parameters = (
            f'parameters: {{ key: "python_path" value: {{ string_value: "{_python_path()}" }} }}\n'
            f'parameters: {{ key: "torch_threads" value: {{ string_value: "{torch_threads}" }} }}\n'
        )
    else:
        backend = 'backend: "pytorch"\ndefault_model_filename: "model.pt"'
        instance_kind = "KIND_AUTO"
        parameters = ""
    return f"""name: "{name}"
{backend}
max_batch_size: {settings.max_batch_size}
version_policy: {{ all {{ }} }}
input [
  {{ name: "input_ids__0" data_type: TYPE_INT64 dims: [ -1 ] }},
  {{ name: "attention_mask__1" data_type: TYPE_INT64 dims: [ -1 ] }}
]
output [
  {{ name: "embedding__0" data_type: TYPE_FP32 dims: [ {dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {settings.max_queue_delay_us} }}
instance_group [ {{ kind: {instance_kind} count: {settings.instances} }} ]
{parameters}"""


def write_version(repo: Path, version: int, towers: dict[str, torch.jit.ScriptModule], dim: int,
                  settings: TritonSettings, torch_threads: int = 0) -> list[str]:
    """Writes both encoders' entries for `version` from {model name: TorchScript module}; a module
    shared by both is saved once and hard-linked. Returns the Triton model names written."""
    saved: dict[int, Path] = {}
    for name in ENCODERS:
        version_dir = repo / name / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        target = version_dir / "model.pt"
        tmp = version_dir / "model.pt.tmp"
        tmp.unlink(missing_ok=True)
        module = towers[name]
        if id(module) in saved:
            try:
                os.link(saved[id(module)], tmp)
            except OSError:
                shutil.copy(saved[id(module)], tmp)
        else:
            torch.jit.save(module, str(tmp))
        tmp.replace(target)
        saved.setdefault(id(module), target)
        shutil.copy(TEMPLATE, version_dir / "model.py")
        (repo / name / "config.pbtxt").write_text(config_pbtxt(name, dim, settings, torch_threads))
    return list(ENCODERS)


def has_version(repo: Path, version: int) -> bool:
    return all((repo / name / str(version) / "model.pt").exists() for name in ENCODERS)


def remove_version(repo: Path, version: int) -> None:
    for name in ENCODERS:
        shutil.rmtree(repo / name / str(version), ignore_errors=True)
