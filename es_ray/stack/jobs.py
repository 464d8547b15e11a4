"""Submitting Ray jobs (`ray job submit` from Python) against the stack's Ray head."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from es_ray.logs import get_logger
from es_ray.stack.manifest import StackManifest

log = get_logger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def current_submission_id() -> str | None:
    """Inside a Ray job: its submission id (what `ray job status` takes), from the job's config."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return json.loads(raw).get("metadata", {}).get("job_submission_id") if raw else None


def client(dashboard_url: str):
    # Authenticates with RAY_AUTH_* of this process: inherited from `ray start` inside the cluster (the
    # driver, jobs), set by control.up (stack/ray_head.py: use_head) in the CLI.
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_url)


def submit(dashboard_url: str, entrypoint: str, submission_id: str | None = None) -> str:
    """Submits `entrypoint` as a Ray job with this checkout as its working dir; returns the job id."""
    # The checkout travels as the job's working dir (.gitignore'd paths such as .venv and .es-ray stay behind).
    runtime_env = {"working_dir": str(REPO_ROOT)} if (REPO_ROOT / "pyproject.toml").exists() else None
    job_id = client(dashboard_url).submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                              submission_id=submission_id)
    log.info("job.submitted", job_id=job_id, entrypoint=entrypoint)
    return job_id


def submit_and_wait(manifest: StackManifest, entrypoint: str, timeout_s: float = 3600,
                    echo_logs: bool = True, on_output: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Runs `entrypoint` as a Ray job and waits for it; returns (status, logs). The job's output as it
    comes goes to `on_output` (a follower that shows it as progress), else to stdout if `echo_logs`."""
    if on_output is None and echo_logs:
        on_output = lambda text: print(text, end="", flush=True)  # noqa: E731, T201 - passed through
    from ray.job_submission import JobStatus

    job_id = submit(manifest.ray_dashboard_url, entrypoint)
    jobs_client = client(manifest.ray_dashboard_url)
    deadline, printed = time.monotonic() + timeout_s, 0
    status = jobs_client.get_job_status(job_id)
    while not status.is_terminal():
        if time.monotonic() > deadline:
            jobs_client.stop_job(job_id)
            raise TimeoutError(f"job {job_id} did not finish within {timeout_s}s")
        time.sleep(1)
        if on_output is not None:
            logs = jobs_client.get_job_logs(job_id)
            on_output(logs[printed:])
            printed = len(logs)
        status = jobs_client.get_job_status(job_id)
    logs = jobs_client.get_job_logs(job_id)
    if on_output is not None:
        on_output(logs[printed:])
    log.info("job.finished", job_id=job_id, status=str(status))
    return ("SUCCEEDED" if status == JobStatus.SUCCEEDED else str(status.value)), logs
