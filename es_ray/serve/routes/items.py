"""PUT and DELETE /v1/items: write items to every live collection (blue, and green while a reindex runs)."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends

from es_ray import metrics
from es_ray.data import pipeline, ray_data_actors
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
    if len(items) > state.settings.serve.large_upsert_items:
        written, failed = _upsert_with_ray_data(state, items)
    else:
        written, failed = pipeline.upsert_now(state.item_encoders, state.pool, state.settings, items)
    if failed and not written:
        raise ServiceUnavailable(f"no item could be stored: {failed[0]['error']}")
    metrics.count("es_ray_upsert_items", written, path="http")
    metrics.count("es_ray_upsert_failures", len(failed), path="http")
    log.info("items.upserted", items=written, failed=len(failed), seconds=round(time.monotonic() - started, 3))
    return schemas.UpsertResponse(upserted=written, failed=[schemas.ItemFailure(**f) for f in failed])


def _upsert_with_ray_data(state: Replica, items: list[dict[str, Any]]) -> tuple[int, list[dict[str, str]]]:
    """A large body goes through the Ray Data pipeline: its encoder actors spread over the cluster."""
    import ray.data

    rows = [{"id": i["id"], "text": i["text"], "payload_json": json.dumps(i["payload"])} for i in items]
    written, failed = 0, []
    with ray_data_actors.in_use(state.manifest.postgres_dsn):   # Ray Data's actors are not stopped meanwhile
        for batch in pipeline.upsert_dataset(ray.data.from_items(rows), state.settings,
                                             state.manifest.triton_grpc_url, state.manifest.postgres_dsn):
            for item_id, error in zip(batch["id"], batch["error"]):
                if error:
                    failed.append({"id": str(item_id), "error": str(error)})
                else:
                    written += 1
    return written, failed


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
