"""Blue/green: the lifecycle's state, switch, rollback and cleanup, each done by the lifecycle driver."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from es_ray.serve import schemas
from es_ray.serve.errors import driver_call
from es_ray.serve.replica import Replica, replica
from es_ray.serve.routes import ADMIN

router = APIRouter()


@router.get("/v1/lifecycle", dependencies=ADMIN,
            summary="Blue, green and previous collections, locks, tasks, switches, models")
def lifecycle_state(state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.lifecycle_state.remote())


@router.post("/v1/lifecycle/switch", dependencies=ADMIN,
             summary="Make the complete green collection blue (409 says why not)")
def switch(request: schemas.SwitchRequest, state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.switch.remote(force=request.force))


@router.post("/v1/lifecycle/rollback", dependencies=ADMIN,
             summary="Make the previous blue blue again, within its grace period")
def rollback(state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.rollback.remote())


@router.post("/v1/lifecycle/cleanup", dependencies=ADMIN,
             summary="Drop the previous collection and unload its model if its grace period is over (or now)")
def cleanup(request: schemas.CleanupRequest, state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.cleanup.remote(now=request.now))
