"""One self-improvement cycle as a Ray job: fine-tune -> gate -> deploy -> reindex -> switch -> cleanup.

    es-ray cycle                      (submits this job and follows it)
    ray job submit --working-dir . -- python -m es_ray.lifecycle.cycle [--force] [--cleanup-now]

Each step is the lifecycle driver's own operation (the fine-tune and reindex run as their own Ray jobs
and tasks); this job only sequences them and records each step in its `cycle` task, so
`GET /v1/lifecycle` and the Ray dashboard show where a cycle is. A model the quality gate refuses
ends the cycle at the gate unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any, Callable

import ray
from rich.markup import escape

from es_ray.console import Display
from es_ray.lifecycle.task_job import TaskJob, run_as_task
from es_ray.logs import get_logger, to_file
from es_ray.store import blue_green, db, tasks

log = get_logger("es_ray.lifecycle.cycle")


class CycleFailed(RuntimeError):
    pass


class Steps:
    """The cycle's steps as the task's progress: [{step, status, seconds, ...}]."""

    def __init__(self, progress: Callable[[dict[str, Any]], None], display: Display | None = None):
        self.progress, self.steps, self.display = progress, [], display

    def start(self, name: str) -> float:
        self.steps.append({"step": name, "status": "running"})
        self.progress({"stage": name, "steps": self.steps})
        log.info("cycle.step", step=name)
        if self.display:
            self.display.step(name)
        return time.monotonic()

    def end(self, started: float, status: str = "done", **details: Any) -> None:
        self.steps[-1].update({"status": status, "seconds": round(time.monotonic() - started, 1), **details})
        self.progress({"steps": self.steps})
        if self.display:
            reason = f": {escape(str(details['reason']))}" if details.get("reason") else ""
            self.display.note(f"{self.steps[-1]['step']} {status} ({self.steps[-1]['seconds']} s){reason}")


def entrypoint(overrides: dict[str, Any], force: bool, cleanup_now: bool, namespace: str) -> str:
    """The job's command line (`es-ray cycle` and the demo submit it)."""
    return (f"python -m es_ray.lifecycle.cycle --overrides {shlex.quote(json.dumps(overrides))} "
            f"--namespace {namespace}" + (" --force" if force else "") + (" --cleanup-now" if cleanup_now else ""))


def wait_task(dsn: str, task_id: str, poll_s: float = 2.0):
    while True:
        with db.connect(dsn) as conn:
            task = tasks.get(conn, task_id)
        if task.status not in tasks.ACTIVE:
            return task
        time.sleep(poll_s)


def run_cycle(driver, settings, manifest, steps: Steps, overrides: dict[str, Any], force: bool,
              cleanup_now: bool) -> dict[str, Any]:
    dsn = manifest.postgres_dsn
    started = steps.start("fine-tune")
    fine_tune = wait_task(dsn, ray.get(driver.start_fine_tune.remote(overrides))["task_id"])
    if fine_tune.status != "done":
        steps.end(started, "failed", task_id=fine_tune.task_id, error=fine_tune.error)
        raise CycleFailed(f"fine-tune task {fine_tune.task_id} {fine_tune.status}: {fine_tune.error}")
    version = fine_tune.result["version"]
    steps.end(started, task_id=fine_tune.task_id, version=version)

    started = steps.start("gate")
    gate = fine_tune.result["gate"]
    if not gate["candidate"] and not force:
        steps.end(started, "refused", reason=gate["reason"])
        return {"version": version, "switched": False, "stopped_at": "gate", "gate": gate}
    steps.end(started, "passed" if gate["candidate"] else "overridden (--force)", reason=gate["reason"])

    started = steps.start("deploy")
    ray.get(driver.deploy_version.remote(version))
    steps.end(started, version=version)

    started = steps.start("reindex")
    reindex = wait_task(dsn, ray.get(driver.start_reindex.remote(version, "force" if force else "auto"))["task_id"])
    if reindex.status != "done":
        steps.end(started, "failed", task_id=reindex.task_id, error=reindex.error)
        raise CycleFailed(f"reindex task {reindex.task_id} {reindex.status}: {reindex.error}")
    steps.end(started, task_id=reindex.task_id, items=reindex.result["items"],
              items_per_s=reindex.result["items_per_s"])

    started = steps.start("switch")
    switch = reindex.result.get("switch", {})
    if switch.get("status") != "switched":
        steps.end(started, "failed", reason=switch.get("reason"))
        raise CycleFailed(f"the switch to v{version} did not happen: {switch.get('reason')}")
    steps.end(started, switch_id=switch["switch_id"], from_version=switch["from_version"])

    started = steps.start("cleanup")
    if cleanup_now:
        deadline = time.monotonic() + 60
        report = ray.get(driver.cleanup.remote(now=True))
        while report.get("dropped") is None and report.get("previous_until") and time.monotonic() < deadline:
            time.sleep(2)  # the driver leaves replicas a few seconds to let go of the old collection
            report = ray.get(driver.cleanup.remote(now=True))
        steps.end(started, dropped=report.get("dropped"))
    else:
        with db.connect(dsn) as conn:
            until = blue_green.get_state(conn).previous_until
        steps.end(started, "scheduled", previous_until=until.isoformat() if until else None)
    return {"version": version, "switched": True, "from_version": switch["from_version"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--overrides", default="{}", help="JSON object merged over configs/finetune.yaml")
    parser.add_argument("--force", action="store_true",
                        help="deploy and switch even if the quality gate refuses the new model")
    parser.add_argument("--cleanup-now", action="store_true",
                        help="drop the old collection right after the switch instead of after lifecycle.grace_s")
    parser.add_argument("--namespace", default="es-ray", help="Ray namespace of the lifecycle driver")
    args = parser.parse_args(argv)
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"--overrides is not JSON: {err}")

    def work(job: TaskJob) -> dict[str, Any]:
        # The job's terminal (`ray job logs`) shows the steps; the log lines go to the state dir.
        log_path = job.settings.state_path / "logs" / "cycle.log"
        with to_file(log_path) as terminal, Display(terminal) as display:
            display.note(f"logs: {log_path}")
            steps = Steps(job.progress, display)
            result = run_cycle(job.driver, job.settings, job.manifest, steps, overrides, args.force,
                               args.cleanup_now)
        return {**result, "steps": steps.steps}

    return run_as_task(tasks.CYCLE, args.namespace, None,
                       {"overrides": overrides, "force": args.force, "cleanup_now": args.cleanup_now}, work,
                       lambda result: result)


if __name__ == "__main__":
    sys.exit(main())
