"""Deploying a model version to Triton: trace to TorchScript, write the repository entry, load it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import tritonclient.http as triton_http

from es_ray.config import Settings
from es_ray.inference import triton_repo
from es_ray.inference.encoder import load_encoder, query_tower_dir, trace
from es_ray.logs import get_logger

log = get_logger(__name__)


def model_dim(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])


def deploy(settings: Settings, repo: Path, triton_http_url: str, version: int, model_dir: Path) -> None:
    """Makes both encoders of `version` ready in Triton; versions already loaded keep serving."""
    if not triton_repo.has_version(repo, version):
        started = time.monotonic()
        item_tower = trace(load_encoder(model_dir))
        query_dir = query_tower_dir(model_dir)
        query_tower = item_tower if query_dir == Path(model_dir) else trace(load_encoder(query_dir))
        triton_repo.write_version(repo, version, {triton_repo.QUERY_ENCODER: query_tower,
                                                  triton_repo.ITEM_ENCODER: item_tower},
                                  model_dim(model_dir), settings.triton, settings.model.torch_threads)
        log.info("deploy.traced", version=version, seconds=round(time.monotonic() - started, 2))
    client = triton_http.InferenceServerClient(triton_http_url, network_timeout=300)
    for name in triton_repo.ENCODERS:
        if not client.is_model_ready(name, str(version)):
            started = time.monotonic()
            client.load_model(name)
            log.info("deploy.loaded", model=name, version=version, seconds=round(time.monotonic() - started, 2))
    client.close()


def undeploy(repo: Path, triton_http_url: str, version: int) -> None:
    """Removes the version's files and reloads the encoders so Triton unloads just that version."""
    triton_repo.remove_version(repo, version)
    client = triton_http.InferenceServerClient(triton_http_url, network_timeout=300)
    for name in triton_repo.ENCODERS:
        if any((repo / name).glob("[0-9]*")):
            client.load_model(name)
        else:
            client.unload_model(name)
    client.close()
