"""Every es-ray metric, in one list: Ray metrics (ray.util.metrics) exported by each node's metrics agent
in Prometheus format (the head's endpoint is `ray_metrics_url` in stack.json) and shown by the Ray
dashboard where it has Prometheus/Grafana. Ray prefixes each name with `ray_` on export.

Recording never fails the caller: outside a Ray worker (unit tests, plain scripts) or if Ray refuses a
value, it is dropped with a debug log line.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from es_ray.logs import get_logger

log = get_logger(__name__)

LATENCY_MS = [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]

# name -> (kind, description, tag keys)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "es_ray_search_requests": ("counter", "Search requests answered, by model version and outcome", ("model", "status")),
    "es_ray_search_latency_ms": ("histogram", "Search latency inside the replica (embed + pgvector), ms", ("model",)),
    "es_ray_sessions": ("counter", "Search sessions recorded (source: search or external)", ("source",)),
    "es_ray_click_events": ("counter", "Clickstream events received (result: accepted or duplicate)", ("result",)),
    "es_ray_irrelevant_marks": ("counter", "Result lists marked irrelevant", ()),
    "es_ray_improvement_steps": ("counter", "Improvement passes that consumed sessions", ()),
    "es_ray_improvement_sessions": ("counter", "Sessions consumed by the improvement loop", ()),
    "es_ray_improvement_vectors": ("counter", "Items the improvement loop changed (scope: global memories "
                                   "or personal vectors)", ("scope",)),
    "es_ray_upsert_items": ("counter", "Items written (path: http or job)", ("path",)),
    "es_ray_upsert_failures": ("counter", "Items that could not be written (path: http or job)", ("path",)),
    "es_ray_deleted_items": ("counter", "Items deleted", ()),
    "es_ray_reindex_written_items": ("counter", "Items re-embedded into a green collection", ("collection",)),
    "es_ray_reindex_failed_items": ("counter", "Items a reindex could not re-embed (recorded in reindex_failures)",
                                    ("collection",)),
    "es_ray_finetune_trials": ("counter", "Fine-tune trials ended (status: completed, stopped or error)", ("status",)),
    "es_ray_gate_decisions": ("counter", "Quality gate decisions on fine-tuned versions (decision: passed or refused)",
                              ("decision",)),
    "es_ray_switches": ("counter", "Blue switches made (kind: switch or rollback)", ("kind",)),
    "es_ray_blue_model_version": ("gauge", "Model version of the blue (serving) collection", ()),
    "es_ray_auth_refusals": ("counter", "Requests refused for their credentials (status: 401 or 403)", ("status",)),
    "es_ray_rate_limited": ("counter", "Requests refused with 429, by the serve.rate_limits entry they exceeded",
                            ("limit",)),
}


@cache
def _metric(name: str):
    from ray.util import metrics

    kind, description, tags = DEFINITIONS[name]
    if kind == "counter":
        return metrics.Counter(name, description, tags)
    if kind == "gauge":
        return metrics.Gauge(name, description, tags)
    return metrics.Histogram(name, description, LATENCY_MS, tags)


def _record(name: str, method: str, value: float, tags: dict[str, Any]) -> None:
    import ray

    if not ray.is_initialized():
        return
    try:
        getattr(_metric(name), method)(value, tags={k: str(v) for k, v in tags.items()} or None)
    except Exception as err:  # noqa: BLE001 - metrics must never fail a request or a job
        log.debug("metrics.dropped", metric=name, error=str(err))


def count(name: str, value: float = 1, **tags: Any) -> None:
    if value:
        _record(name, "inc", value, tags)


def observe(name: str, value: float, **tags: Any) -> None:
    _record(name, "observe", value, tags)


def set_gauge(name: str, value: float, **tags: Any) -> None:
    _record(name, "set", value, tags)
