"""Credentials of the embedded stack, kept under <state dir>/auth (mode 0700).

With no API key configured, `es-ray up` makes one and writes it to admin.key for local clients (the
CLI, demo, benchmarks, tests); the server only ever sees its SHA-256. The user-token secret is made
the same way when configuration has none.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from es_ray.config import ApiKeyEntry, Settings
from es_ray.serve.auth import hash_key, new_api_key

LOCAL_KEY_NAME = "local-admin"


def auth_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "auth"


def _secret_file(path: Path, make) -> str:
    """The file's content, made (and written with mode 0600) the first time."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(make() + "\n")
    return path.read_text().strip()


def with_local_credentials(settings: Settings) -> Settings:
    """The settings the stack runs with: configured keys, or the local admin key's hash; a token secret."""
    auth = settings.auth.model_copy()
    folder = auth_dir(settings.state_path)
    if not auth.api_keys:
        key = _secret_file(folder / "admin.key", new_api_key)
        auth.api_keys = [ApiKeyEntry(name=LOCAL_KEY_NAME, sha256=hash_key(key))]
    if not auth.user_token_secret:
        auth.user_token_secret = _secret_file(folder / "user_token.secret", lambda: secrets.token_urlsafe(48))
    return settings.model_copy(update={"auth": auth})


def local_api_key(state_dir: str | Path) -> str | None:
    """ES_RAY_API_KEY, else the embedded stack's admin.key, else None."""
    if os.environ.get("ES_RAY_API_KEY"):
        return os.environ["ES_RAY_API_KEY"]
    path = auth_dir(Path(state_dir)) / "admin.key"
    return path.read_text().strip() if path.exists() else None
