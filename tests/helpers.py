"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations


def search(api, query: str, **kwargs) -> dict:
    response = api.post("/v1/search", json={"query": query, **kwargs})
    assert response.status_code == 200, response.text
    return response.json()


def ids(response: dict) -> list[str]:
    return [r["id"] for r in response["results"]]


def register_variant(settings, seed: int, noise: float = 0.02) -> int:
    """Registers a new model version: the blue v1 encoder with seeded noise on its weights (a different
    vector space, same dimension and tokenizer), as a fine-tune would; returns its version."""
    import shutil
    import tempfile
    from pathlib import Path

    import mlflow
    import torch
    from safetensors.torch import load_file, save_file

    from es_ray.inference import registry

    source = registry.download(settings, 1)
    generator = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(dir=settings.state_path) as tmp:
        target = Path(tmp) / "model"
        shutil.copytree(source, target)
        weights = load_file(str(target / "model.safetensors"))
        for name, tensor in weights.items():
            if tensor.is_floating_point() and tensor.ndim == 2:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * noise * tensor.std())
        save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
        registry.client(registry.tracking_uri(settings))
        with mlflow.start_run(experiment_id=registry.ensure_experiment(settings), run_name=f"variant-{seed}") as run:
            mlflow.log_params({"parent_version": 1, "noise": noise, "seed": seed})
        return registry.register_version(settings, run.info.run_id, target, f"v1 with weight noise (seed {seed})",
                                         {"es_ray.test_variant": seed})
