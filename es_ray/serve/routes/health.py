"""GET /healthz: whether every part a request needs answers (checked at most every serve.health_cache_s)."""

from __future__ import annotations

import time
from typing import Any

import ray
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from es_ray.inference.triton_repo import ENCODERS
from es_ray.serve.replica import Replica, replica

router = APIRouter()


@router.get("/healthz", summary="200 once Postgres, Triton, MLflow and the lifecycle driver answer",
            description="The replica checks at most every serve.health_cache_s seconds and answers from its last "
                        "check in between; `checked_at` (Unix time) says when that check was made.",
            responses={503: {"description": "Not healthy: the body says which part is not"}})
def healthz(state: Replica = Depends(replica)) -> JSONResponse:
    status, report = state.health.get(lambda: _check(state))
    return JSONResponse(status_code=status, content=report)


def _check(state: Replica) -> tuple[int, dict[str, Any]]:
    report: dict[str, Any] = {}
    try:
        report.update(ray.get(state.driver.health.remote(), timeout=10))
        report["lifecycle_driver"] = "ok"
    except Exception as err:  # noqa: BLE001
        report["lifecycle_driver"] = f"error: {err}"
    blue = state.blue_watcher.current
    if blue is None:
        report["triton"] = "error: no blue model"
    else:
        ready = all(state.encoder(name, blue).ready() for name in ENCODERS)
        report["triton"] = "ok" if ready else f"error: model v{blue.model_version} not ready"
        report["blue"] = {"model_version": blue.model_version, "collection": blue.collection}
    healthy = all(v == "ok" for k, v in report.items() if k != "blue")
    return 200 if healthy else 503, {"healthy": healthy, **report, "checked_at": round(time.time(), 3)}
