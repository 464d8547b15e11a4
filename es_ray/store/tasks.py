"""SQL for tasks: long-running work (fine-tune, reindex, cycle) run by Ray jobs and watched over HTTP.

A task is created `pending`, claimed `running` by its job, refreshed by the job's heartbeat, and ended
`done` or `failed` with the reason. At most one task per kind is active (a unique partial index), so
two fine-tunes can never run at once, whoever starts them. A job that dies without ending its task
(kill -9, a lost node) is found by `expire_stale`: its heartbeat stops, or Ray says the job ended.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

ACTIVE = ("pending", "running")
FINE_TUNE, REINDEX, CYCLE = "fine-tune", "reindex", "cycle"  # the kinds of task, each run by its own Ray job
KINDS = (FINE_TUNE, REINDEX, CYCLE)


class TaskConflict(RuntimeError):
    """A task of this kind is already active."""


class UnknownTask(LookupError):
    pass


@dataclass
class Task:
    task_id: str
    kind: str
    status: str
    params: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    job_id: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None


COLUMNS = ("task_id, kind, status, params, progress, result, error, job_id, created_at, started_at, finished_at, "
           "heartbeat_at")


def create(conn: psycopg.Connection, kind: str, params: dict[str, Any], job_id: str | None = None,
           status: str = "pending") -> Task:
    """A new task; TaskConflict (naming the active one) if a task of this kind is pending or running."""
    task_id = uuid.uuid4().hex
    try:
        with conn.transaction():
            conn.execute(
                """INSERT INTO tasks (task_id, kind, status, params, job_id, started_at, heartbeat_at)
                   VALUES (%s, %s, %s, %s, %s, CASE WHEN %s = 'running' THEN now() END,
                           CASE WHEN %s = 'running' THEN now() END)""",
                (task_id, kind, status, Jsonb(params), job_id, status, status))
    except psycopg.errors.UniqueViolation:
        active = active_task(conn, kind)
        where = f"task {active.task_id}, {active.status} since {active.created_at:%Y-%m-%d %H:%M:%S}Z" if active else "?"
        raise TaskConflict(f"a {kind} is already running ({where}); wait for it to end") from None
    return get(conn, task_id)


def get(conn: psycopg.Connection, task_id: str) -> Task:
    row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE task_id = %s", (task_id,)).fetchone()
    if row is None:
        raise UnknownTask(f"no task {task_id!r}")
    return Task(*row)


def active_task(conn: psycopg.Connection, kind: str) -> Task | None:
    row = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE kind = %s AND status IN ('pending', 'running')",
                       (kind,)).fetchone()
    return Task(*row) if row else None


def recent(conn: psycopg.Connection, kind: str | None = None, limit: int = 20) -> list[Task]:
    rows = conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE %s::text IS NULL OR kind = %s "
                        "ORDER BY created_at DESC LIMIT %s", (kind, kind, limit)).fetchall()
    return [Task(*r) for r in rows]


def set_job(conn: psycopg.Connection, task_id: str, job_id: str) -> None:
    conn.execute("UPDATE tasks SET job_id = %s WHERE task_id = %s", (job_id, task_id))


def start(conn: psycopg.Connection, task_id: str, job_id: str | None) -> Task:
    """The job claims its task; refuses a task that is not pending (ended, or claimed by another job)."""
    row = conn.execute(
        """UPDATE tasks SET status = 'running', started_at = now(), heartbeat_at = now(),
               job_id = COALESCE(%s, job_id)
           WHERE task_id = %s AND status = 'pending' RETURNING task_id""", (job_id, task_id)).fetchone()
    if row is None:
        task = get(conn, task_id)
        raise TaskConflict(f"task {task_id} is {task.status}, not pending: it cannot be started again")
    return get(conn, task_id)


def heartbeat(conn: psycopg.Connection, task_id: str, progress: dict[str, Any] | None = None) -> bool:
    """Refreshes the heartbeat (and progress); False if the task is no longer running."""
    row = conn.execute(
        """UPDATE tasks SET heartbeat_at = now(), progress = COALESCE(%s, progress)
           WHERE task_id = %s AND status = 'running' RETURNING task_id""",
        (Jsonb(progress) if progress is not None else None, task_id)).fetchone()
    return row is not None


def finish(conn: psycopg.Connection, task_id: str, result: dict[str, Any]) -> None:
    conn.execute("""UPDATE tasks SET status = 'done', result = %s, finished_at = now(), heartbeat_at = now()
                    WHERE task_id = %s AND status = 'running'""", (Jsonb(result), task_id))


def fail(conn: psycopg.Connection, task_id: str, error: str) -> bool:
    """Ends an active task as failed with the reason; False if it had already ended."""
    row = conn.execute("""UPDATE tasks SET status = 'failed', error = %s, finished_at = now()
                          WHERE task_id = %s AND status IN ('pending', 'running') RETURNING task_id""",
                       (error, task_id)).fetchone()
    return row is not None


def stale(conn: psycopg.Connection, lease_s: float) -> list[Task]:
    """Active tasks whose job stopped refreshing them (or never started) for longer than the lease."""
    rows = conn.execute(
        f"""SELECT {COLUMNS} FROM tasks WHERE status IN ('pending', 'running')
            AND COALESCE(heartbeat_at, created_at) < now() - make_interval(secs => %s)""", (lease_s,)).fetchall()
    return [Task(*r) for r in rows]


def active(conn: psycopg.Connection) -> list[Task]:
    return [Task(*r) for r in conn.execute(f"SELECT {COLUMNS} FROM tasks WHERE status IN ('pending', 'running')")]
