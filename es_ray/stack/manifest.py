"""What `es-ray up` started and where it listens, saved as <state dir>/stack.json.

`status` and `down` read it so they act only on what this state dir started; jobs and tests read it
to find the services. It is written with mode 0600: a configured DSN may carry a password.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pydantic import BaseModel

MANIFEST_NAME = "stack.json"


class StackManifest(BaseModel):
    state_dir: str
    ray_address: str = ""          # GCS address, host:port
    ray_dashboard_url: str = ""    # for `ray job submit` and the dashboard
    ray_metrics_url: str = ""      # the head's Prometheus endpoint (es_ray_* and Ray's own metrics)
    ray_started: bool = False      # did this state dir start the Ray head?
    ray_head_ingress: str = ""     # the ingress its environment was started for (serve/deployment.py head_ingress)
    postgres_dsn: str = ""
    postgres_started: bool = False
    triton_url: str = ""           # host:port of Triton's HTTP API (model control, health)
    triton_grpc_url: str = ""      # host:port of Triton's gRPC API (inference)
    triton_metrics_url: str = ""
    triton_pid: int = 0
    mlflow_uri: str = ""
    serve_url: str = ""
    serve_proxy_url: str = ""      # Serve's proxy where it is not serve_url (serve.ingress direct): nobody calls it
    serve_deployed: str = ""       # serve/deployment.py deployed_version of the app the last `up` deployed

    @classmethod
    def path(cls, state_dir: Path) -> Path:
        return Path(state_dir) / MANIFEST_NAME

    @classmethod
    def load(cls, state_dir: Path) -> "StackManifest | None":
        path = cls.path(state_dir)
        if not path.exists():
            return None
        return cls.model_validate_json(path.read_text())

    def save(self) -> None:
        path = self.path(Path(self.state_dir))
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(self.model_dump(), indent=2))
        tmp.replace(path)  # atomic: a crash never leaves half a manifest


def redacted_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***, for what is printed or logged."""
    if not dsn:
        return dsn
    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - unparseable: show nothing of it rather than a password
        return "<unparseable DSN>"
    if parts.get("password"):
        parts["password"] = "***"
    return make_conninfo(**parts)


def free_port(host: str = "127.0.0.1", avoid: set[int] = frozenset()) -> int:
    """A port free now, other than `avoid` (ports chosen for other components but not bound yet)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def port_or_free(port: int, avoid: set[int] = frozenset()) -> int:
    return port if port else free_port(avoid=avoid)
