"""LifecycleDriver: the detached, named Ray actor that owns which model and collection are blue.

Its state lives in Postgres (models, collections, blue), never only in the actor, so a restarted
driver (Ray restarts it: max_restarts=-1) reads it back and carries on. Services find the stack's
addresses through it, so a Ray job needs nothing but the cluster address.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from es_ray import metrics
from es_ray.config import Settings
from es_ray.data import ray_data_actors
from es_ray.inference import deploy, registry
from es_ray.improve.loop import Follower, ImprovementLoop, improve_once, learning_from
from es_ray.inference.encoder import resolve_model_dir
from es_ray.inference.triton_client import RecentEncoders, TritonEncoder, grpc_address
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.lifecycle import switching
from es_ray.lifecycle.handle import DRIVER_NAME, UnknownModel
from es_ray.lifecycle.version_servers import VersionServers
from es_ray.logs import get_logger
from es_ray.periodic import Periodic
from es_ray.stack.manifest import StackManifest
from es_ray.stack import credentials, jobs, triton
from es_ray.store import db, blue_green, locks, reindex_ranges, retention, tasks
from es_ray.store.collections import Collection, collection_name
from es_ray.store.lexical import LexicalIndex

log = get_logger(__name__)


METHOD_THREADS = 4  # calls the actor runs at once (max_concurrency)
LOOPS = 4           # its own threads: housekeeper, Triton keeper, retention, improvement loop
# How long a caller waits for a connection while Postgres is away, before the error: short, so that
# health() reports it well within the replica's 10-s wait, and a loop's pass fails and backs off.
POOL_TIMEOUT_S = 5.0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=METHOD_THREADS)
class LifecycleDriver:
    """Threaded actor (max_concurrency): a long improvement pass never blocks health or blue reads."""

    def __init__(self, settings: dict[str, Any], manifest: dict[str, Any]):
        self.settings = Settings.model_validate(settings)
        self.manifest = StackManifest.model_validate(manifest)
        state_dir = Path(self.manifest.state_dir)
        if self.settings.triton.url:  # an external Triton: every version is loaded into that one server
            self.deployer = deploy.TritonDeployer(self.settings, triton.model_repository(state_dir),
                                                  self.manifest.triton_url, triton.control_headers(state_dir))
        else:  # embedded: each version in a tritonserver of its own, its address recorded for the clients
            self.deployer = VersionServers(self.settings, state_dir, self._record_address)
        db.migrate(self.manifest.postgres_dsn)
        # One pool for the driver's life, not a connection per call: every connection costs Postgres a
        # backend process, and pgvector's register_vector makes eight adapter classes for each connection
        # that are never freed (23 KiB each time; the driver grew 0.4 MB a minute under load, BENCHMARKS.md
        # "The 15-minute memory run"). Room for every thread at once, so no call waits for another's; the
        # extra connections close after 10 idle minutes. Not waited for: the driver starts while Postgres
        # restarts too, and the pool connects when it is back.
        self._pool = db.open_pool(self.manifest.postgres_dsn, size=METHOD_THREADS + LOOPS, timeout_s=POOL_TIMEOUT_S,
                                  autocommit=True, wait=False)
        self._improvement: ImprovementLoop | None = None
        self._encoders = RecentEncoders()  # query encoders of the versions used lately (blue's, green's)
        # After a restart, put the blue model back into Triton if Triton lost it, and finish (or
        # abort) a switch the previous incarnation recorded but did not complete.
        if self.blue() is not None:
            self.ensure_serving()
            self.resume_switches()
        # Each loop's interval, and how far it backs off while idle, is explained in configs/stack.yaml.
        self._tasks_active = 0
        self._housekeeper = Periodic(self._housekeeping, self.settings.tasks.check_interval_s, "housekeeper",
                                     self.settings.tasks.check_max_interval_s)
        self._triton_keeper = Periodic(self._reconcile_triton, self.settings.triton.reconcile_interval_s,
                                       "triton-keeper", self.settings.triton.reconcile_max_interval_s)
        self._retention = Periodic(self.prune_sessions, self.settings.retention.interval_s, "retention")

    def _record_address(self, version: int, grpc_url: str | None) -> None:
        with self._conn() as conn:
            blue_green.set_triton_address(conn, version, grpc_url)

    def _reconcile_triton(self) -> bool:
        """The live versions (blue, green, previous; blue first) must be served: an external Triton that
        restarted (explicit model control) comes back empty and gets them loaded again; in the embedded
        stack a crashed server comes back with its models by itself, and this starts the servers of live
        versions that are not running (after `es-ray down` and up). Holds the deployer's lock, so it never
        loads a version a deploy is writing. True (look again soon) when it
        loaded or started something or could not look."""
        try:
            with self._conn() as conn:
                state = blue_green.get_state(conn)
            if state is None:
                return False
            live = [t.model_version for t in (state.blue, state.green, state.previous) if t is not None]
            return bool(self.deployer.reload_missing(list(dict.fromkeys(live))))
        except Exception as err:  # noqa: BLE001 - Triton is down or restarting: try again next interval
            log.debug("triton.reconcile_failed", error=str(err))
            return True

    def _housekeeping(self) -> bool:
        for step in (self.check_tasks, self.cleanup, self._export_blue, self._stop_idle_ray_data):
            try:
                step()
            except Exception:  # noqa: BLE001 - try again at the next interval
                log.exception("housekeeping.failed", step=step.__name__)
        return self._tasks_active > 0  # an active task's job may die: watch it at the short interval

    def _stop_idle_ray_data(self) -> None:
        """Ray Data's detached helper actors outlive its jobs (es_ray/data/ray_data_actors.py): stopped once
        no task of ours is active and no dataset runs anywhere in the cluster (bulk upsert jobs)."""
        if self._tasks_active == 0:
            ray_data_actors.stop_if_idle(self.manifest.postgres_dsn)

    def wake_housekeeping(self) -> None:
        """A task started (here or as a Ray job of its own): watch tasks at the short interval again. A bulk
        upsert job calls it at its end too, so Ray Data's actors are stopped now, not at the next turn."""
        self._housekeeper.wake()

    def _conn(self):
        """A pooled autocommit connection for a `with` block (given back at its end)."""
        return self._pool.connection()

    def _export_blue(self) -> None:
        blue = self.blue()
        if blue is not None:
            metrics.set_gauge("es_ray_blue_model_version", blue["model_version"])

    def stack(self) -> dict[str, Any]:
        """Addresses and settings for jobs and replicas; no secrets (start_driver leaves them out): any
        caller of the actor would read them."""
        return {"settings": self.settings.model_dump(mode="json"),
                "manifest": self.manifest.model_dump(exclude={"serve_deployed"})}  # as start_driver compares it

    def blue(self) -> dict[str, Any] | None:
        with self._conn() as conn:
            blue = blue_green.get_blue(conn)
        return blue.__dict__ if blue else None

    def ensure_serving(self) -> dict[str, Any]:
        """Idempotent bootstrap: a registered v1, deployed to Triton, with a collection, pointed to by blue."""
        started = time.monotonic()
        with self._conn() as conn:
            blue = blue_green.get_blue(conn)
            if blue is None:
                model_dir = resolve_model_dir(self.settings.model.source)
                version = registry.register_initial_model(self.settings, model_dir)
                local_dir = registry.download(self.settings, version)
                model = blue_green.ModelRecord(version=version, mlflow_uri=registry.model_uri(self.settings, version),
                                              source_dir=str(local_dir), dim=deploy.model_dim(local_dir),
                                              max_length=self.settings.model.max_length)
                blue_green.save_model(conn, model)
                self.deployer.deploy(version, local_dir)
                blue_green.save_model(conn, blue_green.ModelRecord(**{**model.__dict__, "state": "deployed"}))
                name = collection_name(version)
                Collection(name, model.dim).create(conn, self.settings.postgres.hnsw_m,
                                                   self.settings.postgres.hnsw_ef_construction,
                                                   lexical_index=LexicalIndex.from_settings(self.settings.search))
                blue_green.save_collection(conn, name, version, "ready")
                blue_green.set_blue(conn, version, name)
                log.info("lifecycle.bootstrapped", model_version=version, collection=name)
            else:
                self.deployer.deploy(blue.model_version, Path(blue.source_dir))
                # Bring live collections made by an older es-ray up to the current schema (idempotent).
                state = blue_green.get_state(conn)
                for target in state.write_targets():
                    Collection(target.collection, target.dim).create(
                        conn, self.settings.postgres.hnsw_m, self.settings.postgres.hnsw_ef_construction,
                        index=target != state.green, lexical_index=LexicalIndex.from_settings(self.settings.search))
            blue = blue_green.get_blue(conn)
        log.info("lifecycle.serving", model_version=blue.model_version, collection=blue.collection,
                 seconds=round(time.monotonic() - started, 2))
        if self.settings.improve.enabled and self._improvement is None:
            self._improvement = ImprovementLoop(self.improve_pass, self.settings.improve.interval_s,
                                                self.settings.improve.max_interval_s)
        return blue.__dict__

    def improve_pass(self, settle_s: float | None = None) -> dict[str, Any]:
        """One improvement pass over settled sessions, on the blue collection and on green (while it is
        built and until it is switched to): what is learned meanwhile reaches green too."""
        with self._conn() as conn:
            state = blue_green.get_state(conn)
            blue = state.blue
            followers = [Follower(Collection(green.collection, green.dim), self._query_encoder(green).embed_queries)
                         for green in [state.green] if green is not None]
            result = improve_once(conn, Collection(blue.collection, blue.dim), self._query_encoder(blue).embed_queries,
                                  learning_from(self.settings), self.settings.improve.batch_sessions,
                                  self.settings.improve.settle_s if settle_s is None else settle_s,
                                  self.settings.improve.max_pass_results, followers)
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

    def prune_sessions(self) -> dict[str, Any]:
        """One bounded round of retention (store/retention.py); the next interval goes on with the rest."""
        with self._conn() as conn:
            pruned = retention.prune(conn, self.settings.retention, self.settings.learning.exclude_sources)
        if pruned.by_age or pruned.by_count:
            log.info("retention.pruned", **pruned.as_dict())
        return pruned.as_dict()

    def _query_encoder(self, target):
        """One query encoder per live version (blue's and green's), made once."""
        address = grpc_address(target, self.manifest.triton_grpc_url)  # a redeployed version moves
        return self._encoders.get(target.model_version, address, lambda: TritonEncoder.of(
            self.manifest.triton_grpc_url, QUERY_ENCODER, target, self.settings))

    # --- tasks: fine-tune and reindex, each a Ray job ------------------------------------------------

    def _submit(self, kind: str, params: dict[str, Any], module: str) -> dict[str, Any]:
        """Creates a pending task and submits the Ray job that runs it (`python -m module --task-id`);
        TaskConflict if one of that kind is already active."""
        with self._conn() as conn:
            task = tasks.create(conn, kind, {**params, "submitted_by": "api"})
            job_id = f"{kind}-{task.task_id}"
            tasks.set_job(conn, task.task_id, job_id)
            try:
                jobs.submit(self.manifest.ray_dashboard_url,
                            f"python -m {module} --task-id {task.task_id} --namespace {self.settings.ray.namespace}",
                            submission_id=job_id)
            except Exception as err:  # noqa: BLE001 - the task must not stay pending forever
                tasks.fail(conn, task.task_id, f"could not submit the Ray job: {err}")
            self.wake_housekeeping()
            return tasks.get(conn, task.task_id).__dict__

    def start_fine_tune(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return self._submit(tasks.FINE_TUNE, {"config": overrides}, "es_ray.train")

    def check_tasks(self) -> list[str]:
        """Fails active tasks whose Ray job has ended or whose heartbeat is older than the lease;
        returns their ids. Runs every tasks.check_interval_s."""
        ended = []
        lease = self.settings.tasks.lease_s
        with self._conn() as conn:
            stale = {t.task_id for t in tasks.stale(conn, lease)}
            active = tasks.active(conn)
            self._tasks_active = len(active)
            for task in active:
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

    # --- deploy, reindex, switch, rollback, cleanup (es_ray.lifecycle.reindex and .switching) ---------

    def deploy_version(self, version: int) -> dict[str, Any]:
        """Makes a registered version ready in Triton (exported into the repository this driver owns,
        loaded next to the versions serving); records it in `models` the first time. Idempotent."""
        with self._conn() as conn:
            model = blue_green.get_model(conn, version)
            if model is None:
                if not registry.has_version(self.settings, version):
                    raise UnknownModel(f"model version {version} is not registered")
                local_dir = registry.download(self.settings, version)
                model = blue_green.ModelRecord(version, registry.model_uri(self.settings, version), str(local_dir),
                                              deploy.model_dim(local_dir), self.settings.model.max_length)
                blue_green.save_model(conn, model)
        self.deployer.deploy(version, Path(model.source_dir))
        with self._conn() as conn:
            return blue_green.get_model(conn, version).__dict__  # with the address it is served at

    def undeploy_version(self, version: int) -> dict[str, Any]:
        """Unloads a version that blue, green and previous do not use and removes its repository files
        (a switch's cleanup retires the versions it replaced; this is for one deployed and never used, as
        in `make load`'s deploy cycles). Idempotent."""
        with self._conn() as conn:
            state = blue_green.get_state(conn)
            if state is not None and version in {t.model_version for t in state.write_targets()}:
                raise switching.SwitchRefused(f"version {version} is live (blue, green or previous): not undeployed")
            self.deployer.undeploy(version)
            blue_green.set_model_state(conn, version, "retired")
        return {"undeployed": version}

    def start_reindex(self, version: int, switch: str | None = None, hnsw: str | None = None) -> dict[str, Any]:
        """Creates a reindex task and submits its Ray job (es_ray.lifecycle.reindex)."""
        with self._conn() as conn:
            if blue_green.get_model(conn, version) is None and not registry.has_version(self.settings, version):
                raise UnknownModel(f"model version {version} is not registered")
            if blue_green.get_blue(conn).model_version == version:
                raise switching.SwitchRefused(f"version {version} is already blue: nothing to reindex")
        return self._submit(tasks.REINDEX, {"to": version, "switch": switch, "hnsw": hnsw}, "es_ray.lifecycle.reindex")

    # Ray retries these calls when the driver died during one (max_task_retries=-1), with the same
    # arguments: the idempotency key makes the retry answer with the first call's switch.
    def switch(self, force: bool = False, lock_owner: str | None = None,
               expected_green: str | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        with self._conn() as conn:
            return switching.switch(conn, self.settings, self.deployer, force, lock_owner, expected_green,
                                    idempotency_key)

    def rollback(self, idempotency_key: str | None = None) -> dict[str, Any]:
        with self._conn() as conn:
            return switching.rollback(conn, self.settings, self.deployer, idempotency_key)

    def abandon_green(self, expected_green: str | None = None) -> dict[str, Any]:
        with self._conn() as conn:
            return switching.abandon_green(conn, self.settings, self.deployer, expected_green)

    def resume_switches(self) -> list[dict[str, Any]]:
        with self._conn() as conn:
            return switching.resume(conn, self.settings)

    def cleanup(self, now: bool = False) -> dict[str, Any]:
        with self._conn() as conn:
            return switching.cleanup(conn, self.settings, self.deployer, now)

    def lifecycle_state(self) -> dict[str, Any]:
        """Blue, green (with its reindex progress), previous, locks, tasks and recent switches."""
        with self._conn() as conn:
            state = blue_green.get_state(conn)
            if state is None:
                return {"blue": None}

            def describe(target):
                if target is None:
                    return None
                info = {"model_version": target.model_version, "collection": target.collection,
                        "state": (blue_green.get_collection(conn, target.collection) or {}).get("state"),
                        "items": Collection(target.collection, target.dim).count(conn)}
                total, done, _ = reindex_ranges.totals(conn, target.collection)
                if total:
                    info["reindex_ranges"] = {"total": total, "done": done}
                return info

            return {
                "blue": describe(state.blue), "green": describe(state.green), "previous": describe(state.previous),
                "previous_until": state.previous_until, "epoch": state.epoch,
                "locks": [lock.__dict__ for lock in locks.all_locks(conn)],
                "tasks": [t.__dict__ for t in tasks.recent(conn, None, 10)],
                "switches": [s.as_dict() for s in blue_green.recent_switches(conn, 10)],
                "models": blue_green.list_models(conn),
            }

    def status(self) -> dict[str, Any]:
        with self._conn() as conn:
            blue = blue_green.get_blue(conn)
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


def start_driver(settings: Settings, manifest: StackManifest):
    """The running driver, or a new one; a driver started with other settings or addresses is replaced
    (its state is in Postgres, so nothing is lost). It gets the settings without secrets: an actor's
    arguments can be read by whoever can reach the cluster, and stack() hands them to every caller."""
    settings = credentials.without_secrets(settings)
    # What the Serve app was deployed with (serve_deployed) changes at every deploy and is no address:
    # left out, or every `up` would replace the driver.
    addresses = manifest.model_dump(exclude={"serve_deployed"})
    try:
        running = ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace)
        wanted = {"settings": settings.model_dump(mode="json"), "manifest": addresses}
        if ray.get(running.stack.remote(), timeout=60) != wanted:
            ray.kill(running, no_restart=True)
            log.info("lifecycle.driver_replaced", reason="settings or stack addresses changed")
    except ValueError:
        pass  # none running
    return LifecycleDriver.options(name=DRIVER_NAME, namespace=settings.ray.namespace, lifetime="detached",
                                   get_if_exists=True).remote(settings.model_dump(mode="json"), addresses)
