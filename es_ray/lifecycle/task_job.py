"""One way to run a task as a Ray job (fine-tune, reindex, cycle).

The job claims its task (one submitted over HTTP, passed as --task-id) or creates one; a task of the same
kind already active is a conflict and the job exits 2. While the work runs, a heartbeat refreshes the
task's progress (and renews the lock the job holds); the task ends `done` with the result or `failed`
with the reason, whatever ends the job (an exception, `ray job stop`). The last line printed is the
job's answer, as JSON.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from es_ray.config import Settings
from es_ray.lifecycle.handle import job_context
from es_ray.lifecycle.heartbeat import Heartbeat
from es_ray.logs import get_logger
from es_ray.priority import run_as_batch
from es_ray.stack import jobs
from es_ray.stack.manifest import StackManifest
from es_ray.store import db, locks, tasks

log = get_logger(__name__)


class JobRefused(RuntimeError):
    """The job cannot do what it was asked (an invalid config, a busy lock): its task fails with this
    reason and the job exits 2, without a traceback."""


@dataclass
class TaskJob:
    """What a job's work gets: the lifecycle driver, the stack, its task and a progress callback."""

    driver: Any
    settings: Settings
    manifest: StackManifest
    task: tasks.Task
    progress: Callable[[dict[str, Any]], None]
    lock_owner: str | None = None  # the owner name of the lock the job holds


def run_as_task(kind: str, namespace: str, task_id: str | None, params: dict[str, Any],
                work: Callable[[TaskJob], dict[str, Any]], summary: Callable[[dict[str, Any]], dict[str, Any]],
                lock: str | None = None) -> int:
    """Runs `work` as the task `task_id` (or a new task of `kind` with `params`), holding `lock` (a
    `store.locks` name) for the whole job when given. Returns the job's exit code."""
    driver, settings, manifest = job_context(namespace)
    run_as_batch(settings.ray.batch_nice)  # the job's own work (data, scoring, the Tune driver) yields to serving
    with db.connect(manifest.postgres_dsn) as conn:
        try:
            task = (tasks.start(conn, task_id, None) if task_id else
                    tasks.create(conn, kind, {**params, "submitted_by": "ray job"}, jobs.current_submission_id(),
                                 status="running"))
        except tasks.TaskConflict as err:
            return _refuse(str(err))
        _wake_housekeeping(driver)
        owner = f"{kind}:{task.task_id}"  # the driver releases it if the job dies (check_tasks)
        if lock:
            try:
                locks.acquire(conn, lock, owner, settings.lifecycle.lock_lease_s)
            except locks.LockHeld as err:
                tasks.fail(conn, task.task_id, str(err))
                return _refuse(str(err))

    heartbeat = Heartbeat(manifest.postgres_dsn, task.task_id, settings.tasks.heartbeat_s,
                          lock=(lock, owner, settings.lifecycle.lock_lease_s) if lock else None)
    log.info("task.start", kind=kind, task_id=task.task_id, params=task.params)

    def end(status: str, outcome: dict[str, Any] | str) -> None:
        heartbeat.stop()
        with db.connect(manifest.postgres_dsn) as conn:
            if lock:
                locks.release(conn, lock, owner)
            if status == "done":
                tasks.finish(conn, task.task_id, outcome)
            else:
                tasks.fail(conn, task.task_id, outcome)

    try:
        result = work(TaskJob(driver, settings, manifest, task, heartbeat.update, owner if lock else None))
    except JobRefused as err:
        end("failed", str(err))
        return _refuse(str(err))
    except BaseException as err:  # noqa: BLE001 - recorded as the task's reason, then re-raised
        end("failed", failure_reason(err))
        log.exception("task.failed", kind=kind, task_id=task.task_id)
        raise
    end("done", {**result, "task_id": task.task_id})
    print(json.dumps({"task_id": task.task_id, **summary(result)}, default=str))  # noqa: T201 - the job's answer
    return 0


def failure_reason(err: BaseException) -> str:
    """What a failed task says: `ray job stop` (SIGTERM, turned into SystemExit by Ray's driver) as such;
    a Ray worker's error as its own, not Ray's wrapper."""
    if isinstance(err, (SystemExit, KeyboardInterrupt)):
        return f"the job was stopped ({type(err).__name__} {err})"
    cause = getattr(err, "cause", None) or err
    return f"{type(cause).__name__}: {cause}"[:2000]


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)  # noqa: T201 - the job's answer to its submitter
    return 2


def _wake_housekeeping(driver) -> None:
    """The driver's housekeeping backs off while no task is active: it watches this one from now on.
    Fire and forget: a driver restarting meanwhile finds the task at its next look anyway."""
    try:
        driver.wake_housekeeping.remote()
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("task.wake_failed", error=str(err))
