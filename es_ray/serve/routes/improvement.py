"""The improvement loop on demand: run it now, or undo what anonymous clicks taught."""

from __future__ import annotations

from typing import Any

import ray
from fastapi import APIRouter, Depends

from es_ray.improve import loop as improve_loop
from es_ray.serve.errors import invalid
from es_ray.serve.replica import Replica, replica
from es_ray.serve.routes import ADMIN
from es_ray.store.collections import Collection

router = APIRouter()


@router.post("/v1/improvement/run", dependencies=ADMIN,
             summary="Run the improvement loop now over every settled session")
def run_improvement(settle_s: float | None = None, state: Replica = Depends(replica)) -> dict[str, Any]:
    if settle_s is not None and not 0 <= settle_s <= 86_400:
        raise invalid("query", "settle_s", "settle_s must be 0 to 86400")
    return ray.get(state.driver.improve_now.remote(settle_s))


@router.post("/v1/improvement/undo", dependencies=ADMIN,
             summary="Forget what anonymous clicks taught: the model's vectors back, the click evidence gone")
def undo_improvement(state: Replica = Depends(replica)) -> dict[str, Any]:
    blue = state.blue()
    with state.pool.connection() as conn:
        return improve_loop.undo(conn, Collection(blue.collection, blue.dim))
