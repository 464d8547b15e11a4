"""PUT and DELETE /v1/items: write items to every live collection (blue, and green while a reindex runs)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from es_ray import metrics
from es_ray.data import pipeline
from es_ray.data import dual_write
from es_ray.logs import get_logger
from es_ray.serve import schemas
from es_ray.serve.errors import ServiceUnavailable
from es_ray.serve.replica import Replica, replica
from es_ray.serve.routes import ADMIN
from es_ray.store import db

log = get_logger(__name__)
router = APIRouter()


@router.put("/v1/items", response_model=schemas.UpsertResponse, dependencies=ADMIN,
            summary="Insert or replace items (long texts are chunked; each chunk and the average get a vector)")
def upsert(request: schemas.UpsertRequest, state: Replica = Depends(replica)) -> schemas.UpsertResponse:
    state.blue()  # 503 while the stack bootstraps
    items = [item.model_dump() for item in request.items]
    started = time.monotonic()
    # In the replica, whatever the body's size (at most serve.max_items_per_request): a Ray Data run
    # here cost 41-52 s for 276 short items and 304 s for 1,000 SciFact abstracts against 0.9-1.0 s and
    # 93 s in the replica (BENCHMARKS.md). Bulk loads are the Ray Data job (es_ray/data/upsert.py).
    written, failed = pipeline.upsert_now(state.item_encoders, state.pool, state.settings, items)
    if failed and not written:
        raise ServiceUnavailable(f"no item could be stored: {failed[0]['error']}")
    metrics.count("es_ray_upsert_items", written, path="http")
    metrics.count("es_ray_upsert_failures", len(failed), path="http")
    log.info("items.upserted", items=written, failed=len(failed), seconds=round(time.monotonic() - started, 3))
    return schemas.UpsertResponse(upserted=written, failed=[schemas.ItemFailure(**f) for f in failed])


@router.delete("/v1/items", response_model=schemas.DeleteResponse, dependencies=ADMIN, summary="Delete items by id")
def delete(request: schemas.DeleteRequest, state: Replica = Depends(replica)) -> schemas.DeleteResponse:
    state.blue()  # 503 while the stack bootstraps
    try:
        with state.pool.connection() as conn:
            deleted = dual_write.delete_items(conn, request.ids, state.settings.retries.write)
    except db.OperationalError as err:
        raise ServiceUnavailable(f"database unavailable: {err}") from err
    metrics.count("es_ray_deleted_items", deleted)
    return schemas.DeleteResponse(deleted=deleted)
