"""The demo's settings: configs/demo.yaml, with command-line overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from es_ray.config import CONFIG_DIR


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sample(Strict):
    docs: int = Field(500, ge=10)
    train_queries: int = Field(200, ge=5)
    test_queries: int = Field(100, ge=5)
    seed: int = 13


class Users(Strict):
    clients: int = Field(3, ge=1, le=16)


class Traffic(Strict):
    clients: int = Field(2, ge=0, le=16)
    think_s: float = Field(0.2, ge=0)


class Measure(Strict):
    clients: int = Field(4, ge=1, le=16)


class Cycle(Strict):
    force: bool = False
    cleanup_now: bool = True
    finetune: dict[str, Any] = {}


class DemoConfig(Strict):
    sample: Sample = Sample()
    rounds: int = Field(3, ge=1, le=20)
    users: Users = Users()
    traffic: Traffic = Traffic()
    measure: Measure = Measure()
    cycle: Cycle = Cycle()


def load_demo_config(path: Path = CONFIG_DIR / "demo.yaml", **overrides: Any) -> DemoConfig:
    """The YAML file, then each override that is not None (keys: docs, train_queries, test_queries, rounds,
    force)."""
    config = DemoConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    for key in ("docs", "train_queries", "test_queries"):
        if overrides.get(key) is not None:
            setattr(config.sample, key, overrides[key])
    if overrides.get("rounds") is not None:
        config.rounds = overrides["rounds"]
    if overrides.get("force") is not None:
        config.cycle.force = overrides["force"]
    return DemoConfig.model_validate(config.model_dump())  # re-validated: overrides obey the same bounds
