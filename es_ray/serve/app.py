"""The HTTP API: one FastAPI app behind one Ray Serve ingress deployment.

A request reads top to bottom in its route module (routes/: search, items, sessions, improvement,
users, tasks, lifecycle, health, web page): validate (schemas.py) -> embed through Triton
(inference/triton_client.py) -> query or write the blue collection (store/). What a replica holds
(settings, Postgres pool, blue pointer, encoders) is replica.py; how errors are answered, errors.py;
how `es-ray up` deploys it, deployment.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig

from es_ray.serve import deployment, errors, port_reuse, rate_limits, schemas
from es_ray.serve.limits import BodySizeLimit
from es_ray.serve.replica import Replica
from es_ray.serve.routes import health, improvement, items, lifecycle, search, sessions, tasks, users, web_page

app = FastAPI(
    title="es-ray",
    description="Self-improving semantic search: search, clickstream, items, personalisation, fine-tune and "
                "reindex tasks, blue/green lifecycle and health. Errors are JSON objects "
                "{\"error\": message, \"details\": [...]}, except Ray Serve's own 503 when more requests wait "
                "than the replica queues (serve.max_queued_requests): plain text, with Retry-After. "
                "Admin and write routes need an API key "
                "(X-API-Key); a user's sessions and personalisation need that user's token (X-User-Token) or a key.",
    version="0.1.0",
    responses=schemas.ERROR_RESPONSES,
)
app.add_middleware(BodySizeLimit)
errors.install(app)
for routes in (health, search, items, sessions, improvement, users, tasks, lifecycle, web_page):
    app.include_router(routes.router)


@serve.deployment(name="SearchAPI")
@serve.ingress(app)
class SearchAPI:
    """The ingress: one per replica; its routes are plain functions that reach `self.replica`."""

    def __init__(self, namespace: str = "es-ray", settings_version: str = ""):
        # settings_version is unused here: a new value (new keys, limits) means new replicas (deployment.py).
        self.replica = Replica(namespace)
        # Here, not in Replica: rate_limits imports replica.py (through clients.py), so replica.py cannot import it.
        rate_limits.configure(self.replica.settings.serve.rate_limits)
        # before Serve starts the direct-ingress server, which it does once this returns
        port_reuse.bind_replica_port_with_reuse_address()


def search_api(args: dict[str, Any]) -> serve.Deployment:
    """SearchAPI with the deployment options of `args` (see deployment.app_args)."""
    args = {**deployment.DEFAULT_ARGS, **args}
    actor_options: dict[str, Any] = {"num_cpus": float(args["num_cpus"])}
    if args["on_head"]:
        actor_options["resources"] = {"node:__internal_head__": 0.001}  # Ray's own label of the head node
    return SearchAPI.options(num_replicas=int(args["replicas"]),
                             max_ongoing_requests=int(args["max_ongoing_requests"]),
                             max_queued_requests=int(args["max_queued_requests"]),
                             health_check_period_s=float(args["health_check_period_s"]),
                             backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
                             # no access log line per request (as serve.start's global setting, which a
                             # deployment does not inherit): es-ray's own logs and metrics record requests
                             logging_config={"enable_access_log": False},
                             ray_actor_options=actor_options)


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (import path es_ray.serve.app:build_app). `es-ray up` passes
    deployment.app_args(settings); a Serve config (configs/kuberay-rayservice.yaml) passes its own args,
    and its `deployments:` entry overrides these options as any Serve config does."""
    args = {**deployment.DEFAULT_ARGS, **(args or {})}
    return search_api(args).bind(args["namespace"], args["settings_version"])
