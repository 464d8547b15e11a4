"""New model versions for lifecycle tests and benchmarks: v1 with seeded noise on its weights.

A different vector space with the same dimension and tokenizer, registered in MLflow the way a
fine-tune registers its model, so a reindex to it has real work to do and its vectors are checkable.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from es_ray.config import Settings


def register_variant(settings: Settings, seed: int, noise: float = 0.02) -> int:
    """Registers v1's encoder with N(0, noise * std) added to every weight matrix; returns its version."""
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
        for tensor in weights.values():
            if tensor.is_floating_point() and tensor.ndim == 2:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * noise * tensor.std())
        save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
        registry.client(registry.tracking_uri(settings))
        with mlflow.start_run(experiment_id=registry.ensure_experiment(settings), run_name=f"variant-{seed}") as run:
            mlflow.log_params({"parent_version": 1, "noise": noise, "seed": seed})
        return registry.register_version(settings, run.info.run_id, target, f"v1 with weight noise (seed {seed})",
                                         {"es_ray.variant_seed": seed})
