"""How `es-ray up` deploys the API: the deployment's options and its settings version.

configs/stack.yaml's `serve:` section is the one source of what the stack deploys (replicas,
max_ongoing_requests, num_cpus beside host, port and the limits): it is typed, and every key can be
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
from typing import Any

from es_ray.config import ServeSettings, Settings

_DEFAULTS = ServeSettings()
DEFAULT_ARGS: dict[str, Any] = {"namespace": "es-ray", "replicas": _DEFAULTS.replicas,
                                "max_ongoing_requests": _DEFAULTS.max_ongoing_requests,
                                "num_cpus": _DEFAULTS.num_cpus, "settings_version": ""}


def settings_version(settings: Settings) -> str:
    return hashlib.sha256(settings.model_dump_json().encode()).hexdigest()[:16]


def app_args(settings: Settings) -> dict[str, Any]:
    """build_app's args for this stack."""
    return {"namespace": settings.ray.namespace, "replicas": settings.serve.replicas,
            "max_ongoing_requests": settings.serve.max_ongoing_requests, "num_cpus": settings.serve.num_cpus,
            "settings_version": settings_version(settings)}
