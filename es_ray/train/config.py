"""Fine-tuning settings: configs/finetune.yaml, with a request's overrides merged in and validated.

`load_finetune_config(path, overrides)` is the single entry point; unknown keys are refused, so a typo
in a request is a 422, not a silently ignored knob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from es_ray.config import CONFIG_DIR

DEFAULT_FINETUNE_CONFIG = CONFIG_DIR / "finetune.yaml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    max_sessions: int = Field(200_000, ge=1)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 13
    min_train_examples: int = Field(20, ge=1)
    min_heldout_queries: int = Field(5, ge=1)
    eval_corpus_items: int = Field(50_000, ge=10)


class DebiasConfig(_Section):
    enabled: bool = True
    method: Literal["posterior", "ips"] = "posterior"
    propensity: Literal["estimate", "config"] = "estimate"
    min_rank_variation: int = Field(50, ge=1)
    propensity_prior_strength: float = Field(50.0, gt=0)   # > 0: a rank without swaps keeps the prior
    ips_clip: float = Field(10.0, ge=1)
    min_posterior: float = Field(0.1, ge=0, lt=1)
    uncertain_posterior: float = Field(0.02, gt=0, le=1)
    heldout_relevant_at: float | None = Field(0.5, gt=0, le=1)   # None: graded held-out labels
    examination_prior: list[float] = Field(default_factory=lambda: [0.81, 0.56, 0.46, 0.39, 0.29, 0.26, 0.24,
                                                                     0.20, 0.20, 0.19], min_length=1)

    @field_validator("examination_prior")
    @classmethod
    def _check_prior(cls, values: list[float]) -> list[float]:
        if not all(0 < v <= 1 for v in values):
            raise ValueError("examination probabilities must be in (0, 1]")
        return values


class ModelConfig(_Section):
    towers: Literal["query"] = "query"
    max_query_length: int = Field(64, ge=8, le=512)


class TrainConfig(_Section):
    eval_every_steps: int = Field(20, ge=1)
    max_steps: int = Field(400, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    corpus_share: float = Field(0.5, ge=0, lt=1)
    corpus_queries_per_item: int = Field(2, ge=1)
    tuned_weight: float = Field(1.0, gt=0, le=1)
    seed: int = 7


class TuneConfig(_Section):
    num_samples: int = Field(6, ge=1, le=1000)
    max_concurrent_trials: int = Field(2, ge=1)
    cpus_per_trial: float = Field(1.0, gt=0)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(2, ge=1)
    reduction_factor: int = Field(2, ge=2)
    metric: Literal["ndcg@10", "mrr@10", "recall@100"] = "ndcg@10"
    time_budget_s: float = Field(3600, gt=0)


class GateConfig(_Section):
    metric: Literal["ndcg@10", "mrr@10", "recall@100"] = "ndcg@10"
    margin: float = Field(0.0, ge=0)


SPACE_KEYS = {"learning_rate", "frozen_layers", "scale", "epochs", "batch_size"}


class FinetuneConfig(_Section):
    data: DataConfig = DataConfig()
    debias: DebiasConfig = DebiasConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    space: dict[str, dict[str, list[Any]]] = Field(default_factory=dict)
    trial: dict[str, Any] = Field(default_factory=dict)
    gate: GateConfig = GateConfig()

    @field_validator("trial")
    @classmethod
    def _check_trial(cls, trial: dict[str, Any]) -> dict[str, Any]:
        if trial and set(trial) != SPACE_KEYS:
            raise ValueError(f"trial must set exactly {sorted(SPACE_KEYS)} (or nothing); got {sorted(trial)}")
        return trial

    @field_validator("space")
    @classmethod
    def _check_space(cls, space: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        missing, unknown = SPACE_KEYS - set(space), set(space) - SPACE_KEYS
        if missing or unknown:
            raise ValueError(f"space must define exactly {sorted(SPACE_KEYS)}; missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        for key, spec in space.items():
            if len(spec) != 1 or next(iter(spec)) not in {"loguniform", "uniform", "choice"}:
                raise ValueError(f"space.{key} must be one of {{loguniform|uniform: [low, high]}} or {{choice: [...]}}")
            kind, values = next(iter(spec.items()))
            if not values or (kind != "choice" and (len(values) != 2 or not 0 <= values[0] < values[1])):
                raise ValueError(f"space.{key}: {kind} needs [low, high] with 0 <= low < high, got {values}")
        return space


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("space", "trial"):
            out[key] = _merge(out[key], value)
        elif key in ("space", "trial") and isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def load_finetune_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """configs/finetune.yaml (or `path`) with `overrides` merged in; raises pydantic.ValidationError."""
    raw = yaml.safe_load(Path(path or DEFAULT_FINETUNE_CONFIG).read_text()) or {}
    return FinetuneConfig.model_validate(_merge(raw, overrides or {}))
