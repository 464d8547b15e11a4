"""How other processes reach the lifecycle driver: its actor name, an error it answers with, and a Ray
job's way in (the driver hands out the stack's settings and addresses, so a job needs nothing but the
cluster; no secrets: whoever can call the actor reads what it returns, see stack/credentials.py)."""

from __future__ import annotations

from typing import Any

import ray

from es_ray.config import Settings
from es_ray.stack.manifest import StackManifest

DRIVER_NAME = "lifecycle-driver"


class UnknownModel(LookupError):
    """The driver was asked for a model version that is not registered."""


def get_driver(namespace: str = "es-ray"):
    return ray.get_actor(DRIVER_NAME, namespace=namespace)


def job_context(namespace: str = "es-ray") -> tuple[Any, Settings, StackManifest]:
    """Inside a Ray job: connects to the cluster; returns the driver, the stack's settings and addresses."""
    ray.init(address="auto", namespace=namespace, logging_level="warning", log_to_driver=False)
    driver = get_driver(namespace)
    stack = ray.get(driver.stack.remote())
    return driver, Settings.model_validate(stack["settings"]), StackManifest.model_validate(stack["manifest"])
