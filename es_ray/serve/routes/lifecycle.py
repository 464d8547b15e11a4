"""Blue/green: the lifecycle's state, switch, rollback, cleanup and abandoning green, each done by the
lifecycle driver."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Header

from es_ray.serve import schemas
from es_ray.serve.errors import driver_call
from es_ray.serve.replica import Replica, replica
from es_ray.serve.routes import ADMIN

router = APIRouter()

# Optional: a client that retries a switch or rollback (a timeout, a 503) sends the same key again and
# gets the first call's answer. Without one the route makes one, so Ray's own retry of the driver call
# (the driver died during it) is answered the same way.
IdempotencyKey = Header(None, alias="Idempotency-Key", min_length=1, max_length=200,
                        description="The same key again returns the first call's switch instead of moving blue again.")


def _key(given: str | None) -> str:
    return given or uuid.uuid4().hex


@router.get("/v1/lifecycle", dependencies=ADMIN,
            summary="Blue, green and previous collections, locks, tasks, switches, models")
def lifecycle_state(state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.lifecycle_state.remote())


@router.post("/v1/lifecycle/switch", dependencies=ADMIN,
             summary="Make the complete green collection blue (409 says why not)")
def switch(request: schemas.SwitchRequest, state: Replica = Depends(replica),
           idempotency_key: str | None = IdempotencyKey) -> dict[str, Any]:
    return driver_call(state.driver.switch.remote(force=request.force, idempotency_key=_key(idempotency_key)))


@router.post("/v1/lifecycle/rollback", dependencies=ADMIN,
             summary="Make the previous blue blue again, within its grace period")
def rollback(state: Replica = Depends(replica), idempotency_key: str | None = IdempotencyKey) -> dict[str, Any]:
    return driver_call(state.driver.rollback.remote(idempotency_key=_key(idempotency_key)))


@router.post("/v1/lifecycle/cleanup", dependencies=ADMIN,
             summary="Drop the previous collection and unload its model if its grace period is over (or now)")
def cleanup(request: schemas.CleanupRequest, state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.cleanup.remote(now=request.now))


@router.post("/v1/lifecycle/abandon-green", dependencies=ADMIN,
             summary="Give up the green collection (a failed reindex): dual writes off, collection dropped")
def abandon_green(request: schemas.AbandonRequest | None = None, state: Replica = Depends(replica)) -> dict[str, Any]:
    return driver_call(state.driver.abandon_green.remote(expected_green=request.collection if request else None))
