"""Credentials of the embedded stack, kept under <state dir>/auth (mode 0700, each file 0600).

With no API key configured, `es-ray up` makes one and writes it to admin.key for local clients (the
CLI, demo, benchmarks, tests); the server only ever sees its SHA-256. The others:
- user_token.secret: the secret user tokens are signed with (configured, or made at the first `up`).
  It is never an actor's argument or return value (anyone who can call an actor would read it): the
  Serve replicas read it here, or from ES_RAY_AUTH__USER_TOKEN_SECRET where a deployment sets it.
- ray.token: Ray's token authentication (RAY_AUTH_MODE=token) for the embedded head, its jobs and
  every client of it (the CLI, tests, `ray job submit` with RAY_AUTH_TOKEN_PATH pointing here).
- triton_control.key: the header value Triton's model-repository API demands (stack/triton.py), so
  that only the lifecycle driver can load a model (a model.py is code that Triton runs).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from es_ray.config import ApiKeyEntry, Settings
from es_ray.serve.auth import hash_key, new_api_key

LOCAL_KEY_NAME = "local-admin"
USER_TOKEN_SECRET_ENV = "ES_RAY_AUTH__USER_TOKEN_SECRET"


def auth_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "auth"


def _write_secret(path: Path, value: str) -> None:
    """Writes `value` with mode 0600 from the start (no moment in which another user could read it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value)
    tmp.replace(path)


def _secret_file(path: Path, make) -> str:
    """The file's content, made (and written with mode 0600) the first time."""
    if not path.exists():
        _write_secret(path, make() + "\n")
    return path.read_text().strip()


def with_local_credentials(settings: Settings) -> Settings:
    """The settings the stack runs with: configured keys, or the local admin key's hash; a token secret,
    kept in user_token.secret for the replicas (a configured one is written there too)."""
    auth = settings.auth.model_copy()
    folder = auth_dir(settings.state_path)
    if not auth.api_keys:
        key = _secret_file(folder / "admin.key", new_api_key)
        auth.api_keys = [ApiKeyEntry(name=LOCAL_KEY_NAME, sha256=hash_key(key))]
    secret_path = folder / "user_token.secret"
    if auth.user_token_secret:
        if not secret_path.exists() or secret_path.read_text().strip() != auth.user_token_secret:
            _write_secret(secret_path, auth.user_token_secret + "\n")
    else:
        auth.user_token_secret = _secret_file(secret_path, lambda: secrets.token_urlsafe(48))
    return settings.model_copy(update={"auth": auth})


def without_secrets(settings: Settings) -> Settings:
    """The settings as actors may hold, hand out and compare them: the user-token secret left out."""
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={"user_token_secret": ""})})


def with_user_token_secret(settings: Settings) -> Settings:
    """Settings from the lifecycle driver (without secrets) with the user-token secret put back: from the
    environment where a deployment sets it (KubeRay), else from the state dir's user_token.secret."""
    secret = os.environ.get(USER_TOKEN_SECRET_ENV, "")
    path = auth_dir(settings.state_path) / "user_token.secret"
    if not secret and path.exists():
        secret = path.read_text().strip()
    if not secret:
        raise RuntimeError(f"no user-token secret: set {USER_TOKEN_SECRET_ENV} or run `es-ray up` (makes {path})")
    return settings.model_copy(update={"auth": settings.auth.model_copy(update={"user_token_secret": secret})})


def ray_token_path(state_dir: str | Path) -> Path:
    return auth_dir(Path(state_dir)) / "ray.token"


def ensure_ray_token(state_dir: str | Path) -> Path:
    """The embedded head's Ray token file, made the first time (Ray reads it whole: no newline)."""
    path = ray_token_path(state_dir)
    if not path.exists():
        _write_secret(path, secrets.token_hex(32))
    return path


def ensure_triton_control_key(state_dir: str | Path) -> str:
    """The key the embedded Triton's model-repository API wants (stack/triton.py), made the first time."""
    return _secret_file(auth_dir(Path(state_dir)) / "triton_control.key", lambda: secrets.token_urlsafe(32))


def triton_control_key(state_dir: str | Path) -> str | None:
    """That key, or None where there is none (an external Triton: its restrictions are its operator's)."""
    path = auth_dir(Path(state_dir)) / "triton_control.key"
    return path.read_text().strip() if path.exists() else None


def local_api_key(state_dir: str | Path) -> str | None:
    """ES_RAY_API_KEY, else the embedded stack's admin.key, else None."""
    if os.environ.get("ES_RAY_API_KEY"):
        return os.environ["ES_RAY_API_KEY"]
    path = auth_dir(Path(state_dir)) / "admin.key"
    return path.read_text().strip() if path.exists() else None
