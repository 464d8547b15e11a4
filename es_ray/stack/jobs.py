"""Submitting Ray jobs (`ray job submit` from Python) against the stack's Ray head."""

from __future__ import annotations

import os
import time
from pathlib import Path

from es_ray.logs import get_logger
from es_ray.stack.manifest import StackManifest

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def submit_and_wait(manifest: StackManifest, entrypoint: str, timeout_s: float = 3600,
                    echo_logs: bool = True) -> tuple[str, str]:
    """Runs `entrypoint` as a Ray job with this checkout as its working dir; returns (status, logs)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(manifest.ray_dashboard_url)
    # The checkout travels as the job's working dir (.gitignore'd paths such as .venv and .es-ray stay behind).
    runtime_env = {"working_dir": str(REPO_ROOT)} if (REPO_ROOT / "pyproject.toml").exists() else None
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    log.info("job.submitted", job_id=job_id, entrypoint=entrypoint)
    deadline, printed = time.monotonic() + timeout_s, 0
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s")
        time.sleep(1)
        if echo_logs:
            logs = client.get_job_logs(job_id)
            print(logs[printed:], end="", flush=True)  # noqa: T201 - the job's own output, passed through
            printed = len(logs)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if echo_logs:
        print(logs[printed:], end="", flush=True)  # noqa: T201
    log.info("job.finished", job_id=job_id, status=str(status))
    return ("SUCCEEDED" if status == JobStatus.SUCCEEDED else str(status.value)), logs
