"""HTTP clients of a running stack for es-ray's own tools (demo, benchmarks, tests): the Serve URL
with the local API key (see es_ray/stack/credentials.py) in every request."""

from __future__ import annotations

import httpx

from es_ray.serve.auth import API_KEY_HEADER
from es_ray.stack.credentials import local_api_key
from es_ray.stack.manifest import StackManifest


def headers(manifest: StackManifest) -> dict[str, str]:
    key = local_api_key(manifest.state_dir)
    return {API_KEY_HEADER: key} if key else {}


def client(manifest: StackManifest, timeout: float = 60) -> httpx.Client:
    return httpx.Client(base_url=manifest.serve_url, headers=headers(manifest), timeout=timeout)
