"""GET /healthz: whether every part a request needs answers."""

from __future__ import annotations

from typing import Any

import ray
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from es_ray.inference.triton_repo import ENCODERS
from es_ray.serve.replica import Replica, replica

router = APIRouter()


@router.get("/healthz", summary="200 once Postgres, Triton, MLflow and the lifecycle driver answer",
            responses={503: {"description": "Not healthy: the body says which part is not"}})
def healthz(state: Replica = Depends(replica)) -> JSONResponse:
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
    return JSONResponse(status_code=200 if healthy else 503, content={"healthy": healthy, **report})
