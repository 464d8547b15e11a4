"""One self-improvement cycle, as `es-ray cycle` runs it (the `es_ray.lifecycle.cycle` Ray job), followed
from outside through the HTTP API: the cycle task's steps, and the fine-tune trials or reindex items of
the step in progress, as progress bars."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

from es_ray.client import EsRayClient
from es_ray.console import Display
from es_ray.demo.config import Cycle
from es_ray.lifecycle.cycle import entrypoint
from es_ray.stack import jobs
from es_ray.stack.manifest import StackManifest

STEPS = ("fine-tune", "gate", "deploy", "reindex", "switch", "cleanup")
DETAIL = {"fine-tune": ("fine-tune", "trials_done", "trials_total", "trials"),
          "reindex": ("reindex", "items_done", "items_total", "items")}


class CycleJobFailed(RuntimeError):
    def __init__(self, message: str, steps: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.steps = steps or []


def _task_of_job(client: EsRayClient, kind: str, job_id: str) -> dict[str, Any] | None:
    for task in client.tasks(kind, limit=20):
        if task.job_id == job_id:
            return task.model_dump()
    return None


def _latest(client: EsRayClient, kind: str, since: datetime) -> dict[str, Any] | None:
    tasks = client.tasks(kind, limit=1)
    return tasks[0].model_dump() if tasks and tasks[0].created_at >= since else None


def submit_cycle_job(manifest: StackManifest, namespace: str, config: Cycle, display: Display,
                     timeout_s: float = 3 * 3600) -> dict[str, Any]:
    """Submits the cycle job and follows it to its end; returns the cycle task's result."""
    job_id = f"demo-cycle-{uuid.uuid4().hex[:10]}"
    jobs.submit(manifest.ray_dashboard_url, entrypoint(config.finetune, config.force, config.cleanup_now, namespace),
                submission_id=job_id)
    job_client = jobs.client(manifest.ray_dashboard_url)
    deadline = time.monotonic() + timeout_s
    with EsRayClient.for_stack(manifest) as client, display.bar("cycle", total=len(STEPS), unit="steps") as steps_bar:
        detail_bar, detail_step, shown_step = None, None, None
        task, ended_at = None, None
        while time.monotonic() < deadline:
            task = _task_of_job(client, "cycle", job_id) or task
            if task is not None:
                steps = task["progress"].get("steps", [])
                finished = sum(1 for s in steps if s["status"] not in ("running",))
                current = steps[-1]["step"] if steps else "starting"
                steps_bar.update(finished, description=f"cycle ({current})")
                if current != shown_step:
                    display.step(f"cycle: {current}")
                    shown_step = current
                running = current if current in DETAIL and steps[-1]["status"] == "running" else None
                if detail_bar is not None and running != detail_step:
                    detail_bar.done()
                    detail_bar = None
                if running:
                    kind, done_key, total_key, unit = DETAIL[running]
                    sub = _latest(client, kind, task["created_at"])
                    progress = sub["progress"] if sub else {}
                    if detail_bar is None:
                        detail_bar, detail_step = display.bar(f"  {kind}", unit=unit), running
                    detail_bar.update(progress.get(done_key, 0), total=progress.get(total_key) or None,
                                      description=f"  {kind} ({progress.get('stage', 'starting')})")
                if task["status"] in ("done", "failed", "cancelled"):
                    break
            status = job_client.get_job_status(job_id)
            if status.is_terminal():
                # the job records its task's end itself; give the last write a moment to land
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > 30:
                    logs = job_client.get_job_logs(job_id)
                    raise CycleJobFailed(f"cycle job {job_id} ended {status.value} without finishing its task:\n"
                                      f"{logs[-3000:]}")
            time.sleep(1)
        else:
            raise CycleJobFailed(f"cycle job {job_id} did not end within {timeout_s}s")
        if detail_bar is not None:
            detail_bar.done()
    if task["status"] != "done":
        raise CycleJobFailed(f"cycle task {task['task_id']} {task['status']}: {task['error']}",
                          task["progress"].get("steps"))
    return task["result"]
