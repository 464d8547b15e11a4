"""Deploying a model version to Triton: export (ONNX or TorchScript, model.runtime; in a child process,
es_ray/inference/export.py), write the repository entry, load it.

Loads and unloads carry `control_headers`: the embedded Triton answers its model-repository API only to
requests with the lifecycle driver's key (es_ray/stack/triton.py).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from es_ray.config import Settings
from es_ray.inference import export, triton_repo
from es_ray.logs import get_logger

log = get_logger(__name__)


def model_dim(model_dir: Path) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])


def write(settings: Settings, repo: Path, version: int, model_dir: Path) -> None:
    """Exports both encoders of `version` into the repository (model.runtime's files), unless they are there already."""
    if not triton_repo.has_version(repo, version):
        started = time.monotonic()
        made = export.write_version(repo, version, Path(model_dir), model_dim(model_dir), settings.triton,
                                    settings.model.torch_threads, settings.model.runtime, settings.ray.batch_nice,
                                    settings.model.lone_query_threads)
        log.info("deploy.exported", version=version, runtime=settings.model.runtime,
                 seconds=round(time.monotonic() - started, 2), files=made)
    else:  # deployed by an earlier es-ray or with other settings: its config and model.py as they are now
        triton_repo.refresh_version(repo, version, model_dim(model_dir), settings.triton, settings.model.torch_threads,
                                    settings.model.lone_query_threads)


def deploy(settings: Settings, repo: Path, triton_http_url: str, version: int, model_dir: Path,
           control_headers: dict[str, str] | None = None) -> None:
    """Makes both encoders of `version` ready in Triton; versions already loaded keep serving (a model
    that is ready is never loaded again: a load replaces its python-backend stubs)."""
    write(settings, repo, version, model_dir)
    client = triton_http.InferenceServerClient(triton_http_url, network_timeout=300)
    for name in triton_repo.ENCODERS:
        model = triton_repo.served_name(name, version)
        if not client.is_model_ready(model, str(version)):
            started = time.monotonic()
            client.load_model(model, headers=control_headers)
            log.info("deploy.loaded", model=model, version=version, seconds=round(time.monotonic() - started, 2))
    client.close()


def wait_ready(triton_http_url: str, version: int, timeout_s: float = 120) -> None:
    """Waits until both encoders of `version` are ready and each has answered a test inference (one
    two-token row): only then is the version handed to clients."""
    client = triton_http.InferenceServerClient(triton_http_url, network_timeout=60)
    deadline = time.monotonic() + timeout_s
    try:
        for name in triton_repo.ENCODERS:
            model = triton_repo.served_name(name, version)
            while True:
                try:
                    if client.is_model_ready(model, str(version)):
                        break
                except Exception:  # noqa: BLE001 - a (re)starting server: connection refused, or still loading
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Triton model {model} not ready after {timeout_s}s")
                time.sleep(0.3)
            row = np.array([[101, 102]], dtype=np.int64)  # [CLS] [SEP]: any vocabulary has two such ids
            inputs = [triton_http.InferInput("input_ids__0", list(row.shape), "INT64"),
                      triton_http.InferInput("attention_mask__1", list(row.shape), "INT64")]
            inputs[0].set_data_from_numpy(row)
            inputs[1].set_data_from_numpy(np.ones_like(row))
            vector = client.infer(model, inputs, model_version=str(version)).as_numpy("embedding__0")
            if vector is None or not np.isfinite(vector).all():
                raise RuntimeError(f"Triton model {model} answered its test inference with {vector!r}")
    finally:
        client.close()


def undeploy(repo: Path, triton_http_url: str, version: int, control_headers: dict[str, str] | None = None) -> None:
    """Unloads the version's two Triton models (requests in flight finish first) and removes their files."""
    client = triton_http.InferenceServerClient(triton_http_url, network_timeout=300)
    for name in triton_repo.ENCODERS:
        try:
            client.unload_model(triton_repo.served_name(name, version), headers=control_headers)
        except InferenceServerException as err:  # not loaded (a restarted Triton): the files go all the same
            log.warning("deploy.unload_failed", model=triton_repo.served_name(name, version), error=str(err))
    client.close()
    triton_repo.remove_version(repo, version)


def reload_missing(repo: Path, triton_http_url: str, versions: list[int],
                   control_headers: dict[str, str] | None = None) -> list[str]:
    """Loads the models of `versions` (in that order: blue first) that are deployed in the repository but
    not ready in Triton, as after a Triton restart (explicit model control starts with nothing loaded);
    returns what it loaded."""
    client = triton_http.InferenceServerClient(triton_http_url, network_timeout=300)
    loaded = []
    deployed = triton_repo.deployed_versions(repo)
    wanted = [triton_repo.served_name(name, v) for v in versions for name in (triton_repo.QUERY_ENCODER,
                                                                             triton_repo.ITEM_ENCODER)]
    try:
        if not client.is_server_live():
            return loaded
        for model in wanted:
            version = deployed.get(model)
            if version is not None and not client.is_model_ready(model, str(version)):
                started = time.monotonic()
                client.load_model(model, headers=control_headers)
                loaded.append(model)
                log.info("deploy.reloaded", model=model, version=version, seconds=round(time.monotonic() - started, 2))
    finally:
        client.close()
    return loaded


class TritonDeployer:
    """Deploys to and undeploys from one Triton model repository, one change at a time (the repository's
    files and Triton's loads are shared by every caller: the lifecycle driver's requests and its reconcile
    loop)."""

    def __init__(self, settings: Settings, repo: Path, triton_http_url: str,
                 control_headers: dict[str, str] | None = None):
        self.settings, self.repo, self.url = settings, repo, triton_http_url
        self.control_headers = control_headers or {}
        self._lock = threading.Lock()

    def deploy(self, version: int, model_dir: Path) -> None:
        with self._lock:
            deploy(self.settings, self.repo, self.url, version, Path(model_dir), self.control_headers)

    def undeploy(self, version: int) -> None:
        with self._lock:
            undeploy(self.repo, self.url, version, self.control_headers)

    def reload_missing(self, versions: list[int]) -> list[str]:
        with self._lock:
            return reload_missing(self.repo, self.url, versions, self.control_headers)
