"""LifecycleDriver: the detached, named Ray actor that owns which model and collection are blue.

Its state lives in Postgres (models, collections, blue), never only in the actor, so a restarted
driver (Ray restarts it: max_restarts=-1) reads it back and carries on. Services find the stack's
addresses through it, so a Ray job needs nothing but the cluster address.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from es_ray import metrics
from es_ray.config import Settings
from es_ray.inference import deploy, registry
from es_ray.improve.loop import ImprovementLoop, improve_once, learning_from
from es_ray.inference.encoder import resolve_model_dir
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.logs import get_logger
from es_ray.stack.manifest import StackManifest
from es_ray.stack import jobs
from es_ray.store import db, lifecycle, locks, tasks
from es_ray.store.collections import Collection, collection_name

log = get_logger(__name__)

DRIVER_NAME = "lifecycle-driver"
FINE_TUNE = "fine-tune"
REINDEX = "reindex"
CLEANUP_MARGIN_S = 10.0  # even `cleanup --now` leaves replicas this long to let go of the old collection


class SwitchRefused(RuntimeError):
    """The switch (or rollback) cannot happen now; the message says why."""


class UnknownModel(LookupError):
    pass


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
        self._triton_lock = threading.Lock()  # model files and loads: one deploy, undeploy or reload at a time
        # After a restart, put the blue model back into Triton if Triton lost it, and finish (or
        # abort) a switch the previous incarnation recorded but did not complete.
        if self.blue() is not None:
            self.ensure_serving()
            self.resume_switches()
        self._housekeeper = PeriodicThread(self._housekeeping, self.settings.tasks.check_interval_s, "housekeeper")
        self._triton_keeper = PeriodicThread(self._reconcile_triton, self.settings.triton.reconcile_interval_s,
                                             "triton-keeper")

    def _deploy(self, version: int, model_dir) -> None:
        with self._triton_lock:
            deploy.deploy(self.settings, self.repo, self.manifest.triton_url, version, Path(model_dir))

    def _undeploy(self, version: int) -> None:
        with self._triton_lock:
            deploy.undeploy(self.repo, self.manifest.triton_url, version)

    def _reconcile_triton(self) -> None:
        """A restarted Triton (explicit model control) comes back empty: load the live versions again (blue,
        green, previous; blue first). Holds the Triton lock, so it never loads a version a deploy is writing."""
        try:
            with self._conn() as conn:
                state = lifecycle.get_state(conn)
            if state is None:
                return
            live = [t.model_version for t in (state.blue, state.green, state.previous) if t is not None]
            with self._triton_lock:
                deploy.reload_missing(self.repo, self.manifest.triton_url, list(dict.fromkeys(live)))
        except Exception as err:  # noqa: BLE001 - Triton is down or restarting: try again next interval
            log.debug("triton.reconcile_failed", error=str(err))

    def _housekeeping(self) -> None:
        for step in (self.check_tasks, self.cleanup, self._export_blue):
            try:
                step()
            except Exception:  # noqa: BLE001 - try again at the next interval
                log.exception("housekeeping.failed", step=step.__name__)

    def _conn(self):
        return db.connect(self.manifest.postgres_dsn)

    def _export_blue(self) -> None:
        blue = self.blue()
        if blue is not None:
            metrics.set_gauge("es_ray_blue_model_version", blue["model_version"])

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
                self._deploy(version, local_dir)
                lifecycle.save_model(conn, lifecycle.ModelRecord(**{**model.__dict__, "state": "deployed"}))
                name = collection_name(version)
                Collection(name, model.dim).create(conn, self.settings.postgres.hnsw_m,
                                                   self.settings.postgres.hnsw_ef_construction)
                lifecycle.save_collection(conn, name, version, "ready")
                lifecycle.set_blue(conn, version, name)
                log.info("lifecycle.bootstrapped", model_version=version, collection=name)
            else:
                self._deploy(blue.model_version,
                              Path(blue.source_dir))
                # Bring live collections made by an older es-ray up to the current schema (idempotent).
                state = lifecycle.get_state(conn)
                for target in state.write_targets():
                    Collection(target.collection, target.dim).create(
                        conn, self.settings.postgres.hnsw_m, self.settings.postgres.hnsw_ef_construction,
                        index=target != state.green)
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
            result = improve_once(conn, Collection(blue.collection, blue.dim), encoder.embed_queries,
                                  learning_from(self.settings), self.settings.improve.batch_sessions,
                                  self.settings.improve.settle_s if settle_s is None else settle_s)
        if result.get("sessions"):
            metrics.count("es_ray_improvement_steps")
            metrics.count("es_ray_improvement_sessions", result["sessions"])
            metrics.count("es_ray_improvement_vectors", result.get("items_remembered", 0), scope="global")
            metrics.count("es_ray_improvement_vectors", result.get("vectors_personal", 0), scope="personal")
        return result

    def improve_now(self, settle_s: float | None = None) -> dict[str, Any]:
        """Passes until no settled session is left; returns the totals."""
        totals: dict[str, Any] = {"passes": 0, "sessions": 0, "items_remembered": 0, "vectors_personal": 0}
        while True:
            result = self.improve_pass(settle_s)
            if result.get("busy"):
                time.sleep(0.2)  # the background loop holds the lock: wait for it, then continue
                continue
            if not result["sessions"]:
                return totals
            totals["passes"] += 1
            for key in ("sessions", "items_remembered", "vectors_personal"):
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
                    locks.release_owned_by(conn, f"{task.kind}:{task.task_id}")  # its holder is gone
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

    # --- deploy, reindex, switch, rollback, cleanup ---------------------------------------------------

    def deploy_version(self, version: int) -> dict[str, Any]:
        """Makes a registered version ready in Triton (traced into the repository this driver owns,
        loaded next to the versions serving); records it in `models` the first time. Idempotent."""
        with self._conn() as conn:
            model = lifecycle.get_model(conn, version)
            if model is None:
                if not registry.has_version(self.settings, version):
                    raise UnknownModel(f"model version {version} is not registered")
                local_dir = registry.download(self.settings, version)
                model = lifecycle.ModelRecord(version, registry.model_uri(self.settings, version), str(local_dir),
                                              deploy.model_dim(local_dir), self.settings.model.max_length)
                lifecycle.save_model(conn, model)
        self._deploy(version, Path(model.source_dir))
        return model.__dict__

    def start_reindex(self, version: int, switch: str | None = None, hnsw: str | None = None) -> dict[str, Any]:
        """Creates a reindex task and submits its Ray job (es_ray.data.reindex)."""
        with self._conn() as conn:
            if lifecycle.get_model(conn, version) is None and not registry.has_version(self.settings, version):
                raise UnknownModel(f"model version {version} is not registered")
            blue = lifecycle.get_blue(conn)
            if blue.model_version == version:
                raise SwitchRefused(f"version {version} is already blue: nothing to reindex")
            task = tasks.create(conn, REINDEX, {"to": version, "switch": switch, "hnsw": hnsw,
                                                "submitted_by": "api"})
            job_id = f"reindex-{task.task_id}"
            tasks.set_job(conn, task.task_id, job_id)
            try:
                jobs.submit(self.manifest.ray_dashboard_url,
                            f"python -m es_ray.data.reindex --task-id {task.task_id} "
                            f"--namespace {self.settings.ray.namespace}", submission_id=job_id)
            except Exception as err:  # noqa: BLE001 - the task must not stay pending forever
                tasks.fail(conn, task.task_id, f"could not submit the Ray job: {err}")
            return tasks.get(conn, task.task_id).__dict__

    def switch(self, force: bool = False, lock_owner: str | None = None,
               expected_green: str | None = None) -> dict[str, Any]:
        """Makes the (complete) green collection blue; SwitchRefused says why not. Without `force` the
        green model must have passed the quality gate. `lock_owner`: the caller already holds the lock."""
        owner = lock_owner or f"switch:{uuid.uuid4().hex}"
        with self._conn() as conn:
            self._acquire(conn, owner)
            try:
                state = lifecycle.get_state(conn)
                green = state.green
                if green is None:
                    raise SwitchRefused("there is no green collection to switch to: run a reindex first")
                if expected_green and green.collection != expected_green:
                    raise SwitchRefused(f"green is {green.collection}, not {expected_green}")
                collection = lifecycle.get_collection(conn, green.collection)
                if collection["state"] != "ready":
                    raise SwitchRefused(f"green collection {green.collection} is {collection['state']}: "
                                        "its reindex has not finished")
                if not force and not lifecycle.gate_passed(conn, green.model_version):
                    raise SwitchRefused(f"model v{green.model_version} has not passed the quality gate; "
                                        "switch with force to override")
                self._deploy(green.model_version,
                              Path(green.source_dir))  # idempotent: makes sure Triton serves it before the switch
                if state.previous is not None:
                    # One rollback target at a time: the blue being replaced takes the older one's place.
                    self._drop_previous(conn, state.previous)
                record = lifecycle.begin_switch(conn, "switch", state.blue, green, force)
                return self._complete(conn, record)
            finally:
                if lock_owner is None:
                    locks.release(conn, locks.LIFECYCLE, owner)

    def rollback(self) -> dict[str, Any]:
        """Makes the previous blue (kept for the grace period) blue again."""
        owner = f"switch:{uuid.uuid4().hex}"
        with self._conn() as conn:
            self._acquire(conn, owner)
            try:
                state = lifecycle.get_state(conn)
                if state.previous is None:
                    raise SwitchRefused("there is nothing to roll back to: no previous collection "
                                        "(none was switched from, or its grace period is over)")
                self._deploy(state.previous.model_version,
                              Path(state.previous.source_dir))
                record = lifecycle.begin_switch(conn, "rollback", state.blue, state.previous, True)
                return self._complete(conn, record)
            finally:
                locks.release(conn, locks.LIFECYCLE, owner)

    def _acquire(self, conn, owner: str) -> None:
        try:
            locks.acquire(conn, locks.LIFECYCLE, owner, self.settings.lifecycle.lock_lease_s)
        except locks.LockHeld as err:
            raise SwitchRefused(f"{err}: one reindex or switch at a time") from None

    def _complete(self, conn, record: lifecycle.Switch) -> dict[str, Any]:
        if self.settings.lifecycle.switch_pause_s:
            time.sleep(self.settings.lifecycle.switch_pause_s)  # fault-injection window (tests)
        done = lifecycle.complete_switch(conn, record, self.settings.lifecycle.grace_s)
        if done.status == "switched":
            metrics.count("es_ray_switches", kind=done.kind)
            metrics.set_gauge("es_ray_blue_model_version", done.to_version)
        log.info("lifecycle.switched" if done.status == "switched" else "lifecycle.switch_aborted",
                 kind=done.kind, switch_id=done.switch_id, from_collection=done.from_collection,
                 to_collection=done.to_collection, status=done.status, reason=done.reason)
        return done.as_dict()

    def resume_switches(self) -> list[dict[str, Any]]:
        """At start: finishes the switches a dead incarnation recorded (compare-and-swap: at most once)."""
        with self._conn() as conn:
            resumed = [self._complete(conn, record) for record in lifecycle.unfinished_switches(conn)]
            for lock in locks.all_locks(conn):
                if lock.owner.startswith("switch:"):  # only this actor takes those: its predecessor's
                    locks.release(conn, lock.name, lock.owner)
        for record in resumed:
            log.info("lifecycle.switch_resumed", switch_id=record["switch_id"], status=record["status"])
        return resumed

    def cleanup(self, now: bool = False) -> dict[str, Any]:
        """Drops the previous collection and unloads its model once the grace period is over (`now`:
        without waiting for it); purges delete tombstones from blue when nothing is being reindexed."""
        report: dict[str, Any] = {"dropped": None}
        with self._conn() as conn:
            state = lifecycle.get_state(conn)
            if state is None:
                return report
            previous = state.previous
            if previous is not None:
                due = conn.execute("""SELECT previous_until <= now() OR (%s AND switched_at < now() - make_interval(secs => %s))
                                      FROM blue""", (now, CLEANUP_MARGIN_S)).fetchone()[0]
                if not due:
                    report["previous_until"] = state.previous_until
                    return report
                owner = f"cleanup:{uuid.uuid4().hex}"
                try:
                    locks.acquire(conn, locks.LIFECYCLE, owner, self.settings.lifecycle.lock_lease_s)
                except locks.LockHeld:
                    report["busy"] = True
                    return report
                try:
                    report["dropped"] = self._drop_previous(conn, previous)
                finally:
                    locks.release(conn, locks.LIFECYCLE, owner)
            state = lifecycle.get_state(conn)
            if state.green is None and state.previous is None:
                report["tombstones_purged"] = Collection(state.blue.collection, state.blue.dim).purge_tombstones(conn)
                conn.execute("DELETE FROM reindex_ranges WHERE collection = %s", (state.blue.collection,))
        return report

    def _drop_previous(self, conn, previous: lifecycle.Target) -> dict[str, Any] | None:
        """Stops dual writes to the previous collection, drops it and unloads its model (if unused)."""
        if not lifecycle.clear_previous(conn, previous.collection):
            return None
        Collection(previous.collection, previous.dim).drop(conn)
        lifecycle.save_collection(conn, previous.collection, previous.model_version, "dropped")
        live = {t.model_version for t in lifecycle.get_state(conn).write_targets()}
        if previous.model_version not in live:
            self._undeploy(previous.model_version)
            lifecycle.set_model_state(conn, previous.model_version, "retired")
        dropped = {"collection": previous.collection, "model_version": previous.model_version}
        log.info("lifecycle.cleaned_up", **dropped)
        return dropped

    def lifecycle_state(self) -> dict[str, Any]:
        """Blue, green (with its reindex progress), previous, locks, tasks and recent switches."""
        with self._conn() as conn:
            state = lifecycle.get_state(conn)
            if state is None:
                return {"blue": None}

            def describe(target):
                if target is None:
                    return None
                info = {"model_version": target.model_version, "collection": target.collection,
                        "state": (lifecycle.get_collection(conn, target.collection) or {}).get("state"),
                        "items": Collection(target.collection, target.dim).count(conn)}
                ranges = conn.execute("""SELECT count(*), count(done_at) FROM reindex_ranges WHERE collection = %s""",
                                      (target.collection,)).fetchone()
                if ranges[0]:
                    info["reindex_ranges"] = {"total": ranges[0], "done": ranges[1]}
                return info

            return {
                "blue": describe(state.blue), "green": describe(state.green), "previous": describe(state.previous),
                "previous_until": state.previous_until, "epoch": state.epoch,
                "locks": [lock.__dict__ for lock in locks.all_locks(conn)],
                "tasks": [t.__dict__ for t in tasks.recent(conn, None, 10)],
                "switches": [s.as_dict() for s in lifecycle.recent_switches(conn, 10)],
                "models": lifecycle.list_models(conn),
            }

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


def job_context(namespace: str = "es-ray") -> tuple[Any, Settings, StackManifest]:
    """Inside a Ray job: connects to the cluster; returns the driver, the stack's settings and addresses."""
    ray.init(address="auto", namespace=namespace, logging_level="warning", log_to_driver=False)
    driver = get_driver(namespace)
    stack = ray.get(driver.stack.remote())
    return driver, Settings.model_validate(stack["settings"]), StackManifest.model_validate(stack["manifest"])


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
