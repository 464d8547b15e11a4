"""The MLflow model registry: every embedding model version es-ray serves is registered here.

Tracking and registry share one URI (sqlite under the state dir by default). A version's artifact is
the Hugging Face encoder directory itself, so any version can be loaded with transformers alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from es_ray.config import Settings
from es_ray.logs import get_logger

log = get_logger(__name__)
EXPERIMENT = "es-ray-models"


def tracking_uri(settings: Settings) -> str:
    if settings.mlflow.tracking_uri:
        return settings.mlflow.tracking_uri
    return f"sqlite:///{settings.state_path / 'mlflow' / 'mlflow.db'}"


def artifact_root(settings: Settings) -> str:
    return (settings.state_path / "mlflow" / "artifacts").as_uri()


def client(uri: str):
    import mlflow
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(settings: Settings, name: str = EXPERIMENT) -> str:
    mlflow_client = client(tracking_uri(settings))
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=f"{artifact_root(settings)}/{name}")


def register_initial_model(settings: Settings, model_dir: Path) -> int:
    """Registers the base encoder as version 1 unless the registry already has versions; returns 1."""
    import mlflow

    uri = tracking_uri(settings)
    (settings.state_path / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow_client = client(uri)
    name = settings.mlflow.registered_model
    existing = mlflow_client.search_model_versions(f"name = '{name}'")
    if existing:
        return min(int(v.version) for v in existing)
    experiment_id = ensure_experiment(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name="initial-model") as run:
        mlflow.log_params({"source": str(model_dir), "max_length": settings.model.max_length, "pooling": "mean",
                           "normalised": True})
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        mlflow.set_tag("es_ray.role", "initial")
    return _create_version(mlflow_client, name, run.info.run_id, f"{run.info.artifact_uri}/model",
                           f"initial model from {model_dir}", {})


def register_version(settings: Settings, run_id: str, model_dir: Path, description: str,
                     tags: dict[str, str]) -> int:
    """Logs `model_dir` as the run's `model` artifact and registers it as the next version."""
    mlflow_client = client(tracking_uri(settings))
    mlflow_client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    artifact_uri = mlflow_client.get_run(run_id).info.artifact_uri
    return _create_version(mlflow_client, settings.mlflow.registered_model, run_id, f"{artifact_uri}/model",
                           description, tags)


def register_fusion(settings: Settings, run_id: str, description: str, tags: dict[str, str]) -> int:
    """Registers the run's `fusion.json` (a click-learned hybrid fusion) as the next version of
    mlflow.registered_fusion, as a fine-tuned encoder is registered."""
    mlflow_client = client(tracking_uri(settings))
    artifact_uri = mlflow_client.get_run(run_id).info.artifact_uri
    return _create_version(mlflow_client, settings.mlflow.registered_fusion, run_id, f"{artifact_uri}/fusion.json",
                           description, tags, what="es-ray hybrid fusion (RRF k and list weights) learned from clicks")


def tag_version(settings: Settings, name: str, version: int, tags: dict[str, str]) -> None:
    mlflow_client = client(tracking_uri(settings))
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, str(value))


def _create_version(mlflow_client, name: str, run_id: str, source: str, description: str,
                    tags: dict[str, str], what: str = "es-ray embedding model (query and item encoder)") -> int:
    if not mlflow_client.search_registered_models(f"name = '{name}'"):
        mlflow_client.create_registered_model(name, description=what)
    version = mlflow_client.create_model_version(name, source=source, run_id=run_id, description=description,
                                                 tags={k: str(v) for k, v in tags.items()})
    log.info("registry.registered", name=name, version=version.version, run_id=run_id)
    return int(version.version)


def download(settings: Settings, version: int) -> Path:
    """The version's encoder directory, copied once under <state dir>/models/v<version>."""
    import mlflow

    target = settings.state_path / "models" / f"v{version}"
    if (target / "config.json").exists():
        return target
    client(tracking_uri(settings))
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{settings.mlflow.registered_model}/{version}", dst_path=str(tmp)))
    local.rename(target) if local != tmp else tmp.rename(target)
    return target


def model_uri(settings: Settings, version: int) -> str:
    return f"models:/{settings.mlflow.registered_model}/{version}"


def has_version(settings: Settings, version: int) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client(tracking_uri(settings)).get_model_version(settings.mlflow.registered_model, str(version))
        return True
    except MlflowException:
        return False
