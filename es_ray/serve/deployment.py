"""How `es-ray up` deploys the API: the deployment's options and its settings version.

configs/stack.yaml's `serve:` section is the one source of what the stack deploys (replicas, ingress,
max_ongoing_requests, max_queued_requests, num_cpus, health_check_period_s beside host, port and the limits): it is typed, and every key can be
overridden from the environment as every other stack setting. A second Serve YAML for the same app
would need rules for which file wins, so there is none; a cluster deployment (KubeRay) writes its
Serve config in its own manifest and passes the same args to build_app.

Replicas read the settings once, at start. New settings (keys, limits) reach them because each
`serve.run` restarts the replicas: Serve gives every imperative deploy a new code version, and
`.options(version=...)` is gone. That is also why there is no `user_config` + `reconfigure()` here: a
live update happens only where the code version stays the same, which takes a declarative deploy (a
Serve config through `serve deploy` or the dashboard's REST API). The settings version below makes the
restart explicit for such a deploy too, since a Serve config's args are part of its code version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from es_ray.config import ServeSettings, Settings

_DEFAULTS = ServeSettings()
DEFAULT_ARGS: dict[str, Any] = {"namespace": "es-ray", "replicas": _DEFAULTS.replicas,
                                "max_ongoing_requests": _DEFAULTS.max_ongoing_requests,
                                "max_queued_requests": _DEFAULTS.max_queued_requests,
                                "num_cpus": _DEFAULTS.num_cpus,
                                "health_check_period_s": _DEFAULTS.health_check_period_s,
                                "on_head": False, "settings_version": ""}


def settings_version(settings: Settings) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


def deployed_version(settings: Settings) -> str:
    """What a running app must match for `es-ray up` to leave its replica alone: the settings and es-ray's
    own code (a new es-ray installed beside a running stack reaches the replicas at the next `up`)."""
    package = Path(__file__).resolve().parents[1]
    code = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        code.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return f"{settings_version(settings)}-{code.hexdigest()[:16]}"


def app_args(settings: Settings) -> dict[str, Any]:
    """build_app's args for this stack."""
    return {"namespace": settings.ray.namespace, "replicas": settings.serve.replicas,
            "max_ongoing_requests": settings.serve.max_ongoing_requests,
            "max_queued_requests": settings.serve.max_queued_requests, "num_cpus": settings.serve.num_cpus,
            "health_check_period_s": settings.serve.health_check_period_s,
            # direct ingress: only the head's environment has it, and serve.port is the head's
            "on_head": settings.direct_ingress, "settings_version": settings_version(settings)}


def direct_ingress_env(settings: Settings) -> dict[str, str]:
    """Ray's environment for serve.ingress `direct` (Ray Serve's direct ingress, set when the head starts):
    the replica's own HTTP server takes its port from a range that holds serve.port alone. A port a
    replica gave back is free again at once (Serve's default holds it back for a load balancer to notice,
    there is none), and a stopping replica drains 2 s instead of 30, so the replica of the next `es-ray
    up` gets serve.port quickly. The replica binds it with SO_REUSEADDR (port_reuse.py), so the old one's
    closing connections do not hold it; where the port is still taken (a replica of an es-ray before that
    change, whose connections sit in TIME_WAIT for 60 s), the new one fails to start and Serve starts it
    again, up to 30 times instead of 3 (about two minutes)."""
    if not settings.direct_ingress:
        return {}
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(settings.serve.port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(settings.serve.port + 1),  # exclusive
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "30"}


def head_ingress(settings: Settings) -> str:
    """What the Ray head's environment fixes about the ingress, as the manifest records it: a head started
    for one has to be started again for another (`es-ray down`, `es-ray up`)."""
    return f"direct:{settings.serve.port}" if settings.direct_ingress else "proxy"
