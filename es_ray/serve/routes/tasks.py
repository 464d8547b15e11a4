"""Long-running work as Ray jobs: start a fine-tune or a reindex, read tasks."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from es_ray.serve import schemas
from es_ray.serve.errors import driver_call, invalid, path_id
from es_ray.serve.replica import Replica, replica
from es_ray.serve.routes import ADMIN
from es_ray.store import tasks

router = APIRouter()


@router.post("/v1/tasks/fine-tune", status_code=202, response_model=schemas.TaskOut, dependencies=ADMIN,
             summary="Start a fine-tune from the clickstream (a Ray job); 409 while one runs")
def start_fine_tune(request: schemas.FineTuneRequest, state: Replica = Depends(replica)) -> schemas.TaskOut:
    return schemas.TaskOut(**driver_call(state.driver.start_fine_tune.remote(request.config)))


@router.post("/v1/tasks/reindex", status_code=202, response_model=schemas.TaskOut, dependencies=ADMIN,
             summary="Re-embed every item with a model version into a green collection (a Ray job); 409 while "
                     "a reindex or switch runs, 404 for an unknown version")
def start_reindex(request: schemas.ReindexRequest, state: Replica = Depends(replica)) -> schemas.TaskOut:
    return schemas.TaskOut(**driver_call(state.driver.start_reindex.remote(request.to, request.switch, request.hnsw)))


@router.get("/v1/tasks/{task_id}", response_model=schemas.TaskOut, dependencies=ADMIN,
            summary="A task: status, progress, result")
def read_task(task_id: str, state: Replica = Depends(replica)) -> schemas.TaskOut:
    path_id(task_id, "task_id")
    with state.pool.connection() as conn:
        return schemas.TaskOut(**tasks.get(conn, task_id).__dict__)


@router.get("/v1/tasks", response_model=schemas.TaskList, dependencies=ADMIN, summary="Recent tasks, newest first")
def list_tasks(kind: str | None = Query(None, pattern=f"^({'|'.join(tasks.KINDS)})$",
                                        description=f"one of {', '.join(tasks.KINDS)}"),
               limit: int = 20, state: Replica = Depends(replica)) -> schemas.TaskList:
    if not 1 <= limit <= 200:
        raise invalid("query", "limit", "limit must be 1 to 200")
    with state.pool.connection() as conn:
        return schemas.TaskList(tasks=[schemas.TaskOut(**t.__dict__) for t in tasks.recent(conn, kind, limit)])
