"""LifecycleDriver: the detached, named Ray actor that owns which model and collection are blue.

Its state lives in Postgres (models, collections, blue), never only in the actor, so a restarted
driver (Ray restarts it: max_restarts=-1) reads it back and carries on. Services find the stack's
addresses through it, so a Ray job needs nothing but the cluster address.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import ray

from es_ray.config import Settings
from es_ray.inference import deploy, registry
from es_ray.improve.loop import ImprovementLoop, adjuster_from, improve_once
from es_ray.inference.encoder import resolve_model_dir
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.logs import get_logger
from es_ray.stack.manifest import StackManifest
from es_ray.stack import jobs
from es_ray.store import db, lifecycle, tasks
from es_ray.store.collections import Collection, collection_name

log = get_logger(__name__)

DRIVER_NAME = "lifecycle-driver"
FINE_TUNE = "fine-tune"


class PeriodicThread:
    """Calls `fn` every `interval_s` in a daemon thread."""

    def __init__(self, fn, interval_s: float, name: str):
        self.fn, self.interval_s, self._stop = fn, interval_s, threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.fn()

    def stop(self) -> None:
        self._stop.set()


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=4)
class LifecycleDriver:
    """Threaded actor (max_concurrency): a long improvement pass never blocks health or blue reads."""

    def __init__(self, settings: dict[str, Any], manifest: dict[str, Any]):
        self.settings = Settings.model_validate(settings)
        self.manifest = StackManifest.model_validate(manifest)
        self.repo = Path(self.manifest.state_dir) / "triton" / "models"
        db.migrate(self.manifest.postgres_dsn)
        self._improvement: ImprovementLoop | None = None
        self._task_watcher = PeriodicThread(self._check_tasks_safely, self.settings.tasks.check_interval_s,
                                            "task-watcher")
        # After a restart, put the blue model back into Triton if Triton lost it.
        if self.blue() is not None:
            self.ensure_serving()

    def _check_tasks_safely(self) -> None:
        try:
            self.check_tasks()
        except Exception:  # noqa: BLE001 - try again at the next interval
            log.exception("task.check_failed")

    def _conn(self):
        return db.connect(self.manifest.postgres_dsn)

    def stack(self) -> dict[str, Any]:
        """Addresses and settings for jobs and replicas."""
        return {"settings": self.settings.model_dump(mode="json"), "manifest": self.manifest.model_dump()}

    def blue(self) -> dict[str, Any] | None:
        with self._conn() as conn:
            blue = lifecycle.get_blue(conn)
        return blue.__dict__ if blue else None

    def ensure_serving(self) -> dict[str, Any]:
        """Idempotent bootstrap: a registered v1, deployed to Triton, with a collection, pointed to by blue."""
        started = time.monotonic()
        with self._conn() as conn:
            blue = lifecycle.get_blue(conn)
            if blue is None:
                model_dir = resolve_model_dir(self.settings.model.source)
                version = registry.register_initial_model(self.settings, model_dir)
                local_dir = registry.download(self.settings, version)
                model = lifecycle.ModelRecord(version=version, mlflow_uri=registry.model_uri(self.settings, version),
                                              source_dir=str(local_dir), dim=deploy.model_dim(local_dir),
                                              max_length=self.settings.model.max_length)
                lifecycle.save_model(conn, model)
                deploy.deploy(self.settings, self.repo, self.manifest.triton_url, version, local_dir)
                lifecycle.save_model(conn, lifecycle.ModelRecord(**{**model.__dict__, "state": "deployed"}))
                name = collection_name(version)
                Collection(name, model.dim).create(conn, self.settings.postgres.hnsw_m,
                                                   self.settings.postgres.hnsw_ef_construction)
                lifecycle.save_collection(conn, name, version, "ready")
                lifecycle.set_blue(conn, version, name)
                log.info("lifecycle.bootstrapped", model_version=version, collection=name)
            else:
                deploy.deploy(self.settings, self.repo, self.manifest.triton_url, blue.model_version,
                              Path(blue.source_dir))
            blue = lifecycle.get_blue(conn)
        log.info("lifecycle.serving", model_version=blue.model_version, collection=blue.collection,
                 seconds=round(time.monotonic() - started, 2))
        if self.settings.improve.enabled and self._improvement is None:
            self._improvement = ImprovementLoop(self.improve_pass, self.settings.improve.interval_s)
        return blue.__dict__

    def improve_pass(self, settle_s: float | None = None) -> dict[str, Any]:
        """One improvement pass over settled sessions, on the blue collection."""
        with self._conn() as conn:
            blue = lifecycle.get_blue(conn)
            encoder = self._query_encoder(blue)
            return improve_once(conn, Collection(blue.collection, blue.dim), encoder.embed_queries,
                                adjuster_from(self.settings), self.settings.improve.batch_sessions,
                                self.settings.improve.settle_s if settle_s is None else settle_s)

    def improve_now(self, settle_s: float | None = None) -> dict[str, Any]:
        """Passes until no settled session is left; returns the totals."""
        totals: dict[str, Any] = {"passes": 0, "sessions": 0, "vectors_global": 0, "vectors_personal": 0}
        while True:
            result = self.improve_pass(settle_s)
            if result.get("busy"):
                time.sleep(0.2)  # the background loop holds the lock: wait for it, then continue
                continue
            if not result["sessions"]:
                return totals
            totals["passes"] += 1
            for key in ("sessions", "vectors_global", "vectors_personal"):
                totals[key] += result.get(key, 0)

    def _query_encoder(self, blue):
        key = blue.model_version
        if getattr(self, "_encoder_version", None) != key:
            self._encoder = TritonEncoder(self.manifest.triton_grpc_url, QUERY_ENCODER, blue.model_version,
                                          blue.source_dir, blue.max_length, self.settings.triton.max_batch_size,
                                          self.settings.triton.timeout_s, self.settings.model.query_pad_multiple)
            self._encoder_version = key
        return self._encoder

    # --- tasks: fine-tune (and later reindex) as Ray jobs ------------------------------------------

    def start_fine_tune(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """Creates a fine-tune task and submits its Ray job; TaskConflict if one is already active."""
        with self._conn() as conn:
            task = tasks.create(conn, FINE_TUNE, {"config": overrides, "submitted_by": "api"})
            job_id = f"fine-tune-{task.task_id}"
            tasks.set_job(conn, task.task_id, job_id)
            try:
                jobs.submit(self.manifest.ray_dashboard_url,
                            f"python -m es_ray.train --task-id {task.task_id} --namespace {self.settings.ray.namespace}",
                            submission_id=job_id)
            except Exception as err:  # noqa: BLE001 - the task must not stay pending forever
                tasks.fail(conn, task.task_id, f"could not submit the Ray job: {err}")
            return tasks.get(conn, task.task_id).__dict__

    def check_tasks(self) -> list[str]:
        """Fails active tasks whose Ray job has ended or whose heartbeat is older than the lease;
        returns their ids. Runs every tasks.check_interval_s."""
        ended = []
        lease = self.settings.tasks.lease_s
        with self._conn() as conn:
            stale = {t.task_id for t in tasks.stale(conn, lease)}
            for task in tasks.active(conn):
                reason = self._job_ended(task.job_id)
                if reason is None and task.task_id in stale:
                    reason = f"no heartbeat from its job for more than {lease:.0f}s: the job is presumed dead"
                if reason and tasks.fail(conn, task.task_id, reason):
                    log.warning("task.failed", task_id=task.task_id, kind=task.kind, reason=reason)
                    ended.append(task.task_id)
        return ended

    def _job_ended(self, job_id: str | None) -> str | None:
        if not job_id:
            return None
        try:
            info = jobs.client(self.manifest.ray_dashboard_url).get_job_info(job_id)
        except Exception:  # noqa: BLE001 - unknown to Ray (a CLI job's Ray id) or the dashboard is busy
            return None
        if not info.status.is_terminal():
            return None
        return (f"its Ray job {job_id} ended {info.status.value} without finishing the task"
                + (f": {info.message}" if info.message else ""))

    def status(self) -> dict[str, Any]:
        with self._conn() as conn:
            blue = lifecycle.get_blue(conn)
            count = Collection(blue.collection, blue.dim).count(conn) if blue else 0
        return {"blue": blue.__dict__ if blue else None, "items": count}

    def health(self) -> dict[str, str]:
        """Postgres and the MLflow registry, as seen from the driver."""
        report = {}
        try:
            with self._conn() as conn:
                conn.execute("SELECT 1")
            report["postgres"] = "ok"
        except Exception as err:  # noqa: BLE001
            report["postgres"] = f"error: {err}"
        try:
            registry.client(registry.tracking_uri(self.settings)).search_registered_models(max_results=1)
            report["mlflow"] = "ok"
        except Exception as err:  # noqa: BLE001
            report["mlflow"] = f"error: {err}"
        return report


def get_driver(namespace: str = "es-ray"):
    return ray.get_actor(DRIVER_NAME, namespace=namespace)


def start_driver(settings: Settings, manifest: StackManifest):
    """The running driver, or a new one; a driver started with other settings or addresses is replaced
    (its state is in Postgres, so nothing is lost)."""
    try:
        running = ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace)
        wanted = {"settings": settings.model_dump(mode="json"), "manifest": manifest.model_dump()}
        if ray.get(running.stack.remote(), timeout=60) != wanted:
            ray.kill(running, no_restart=True)
            log.info("lifecycle.driver_replaced", reason="settings or stack addresses changed")
    except ValueError:
        pass  # none running
    return LifecycleDriver.options(name=DRIVER_NAME, namespace=settings.ray.namespace, lifetime="detached",
                                   get_if_exists=True).remote(settings.model_dump(mode="json"), manifest.model_dump())
