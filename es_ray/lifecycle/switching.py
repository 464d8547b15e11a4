"""Switch, rollback and cleanup: the moves of blue/green, as plain functions of a connection, the
settings and a deployer (what loads and unloads models in Triton), so that a test drives them against
Postgres without Ray. The lifecycle driver calls them; the `blue` row itself is only written by
`store.blue_green`.

- switch: the complete green collection becomes blue; the old blue stays as `previous` (writes still
  reach it) for `lifecycle.grace_s`, so a rollback loses nothing.
- rollback: the previous blue becomes blue again.
- cleanup: once the grace period is over, the previous collection is dropped and its model unloaded.
- abandon: a green collection whose reindex failed stops taking dual writes and is dropped.
Each move records its intent in `switches` first and then swaps blue in one compare-and-swap
transaction: a driver killed half-way finishes it at start (`resume`), at most once. Ray retries a call
whose driver died (max_task_retries=-1): a switch or rollback that carries an idempotency key records
it as its switch id, so the retry answers with the first call's row instead of moving blue again (a
second rollback would bring the bad version back). Cleanup and abandon need no key: they act on the
state they find (compare-and-swap), so a retry finds nothing left to do.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import psycopg

from es_ray import metrics
from es_ray.config import Settings
from es_ray.logs import get_logger
from es_ray.store import blue_green, fusion_weights, locks, reindex_ranges
from es_ray.store.collections import Collection

log = get_logger(__name__)

CLEANUP_MARGIN_S = 10.0  # even `cleanup --now` leaves replicas this long to let go of the old collection
SWITCH_OWNER = "switch:"  # lock owners taken by switches and rollbacks (only the driver takes them)


class SwitchRefused(RuntimeError):
    """The switch (or rollback) cannot happen now; the message says why."""


class Deployer(Protocol):
    def deploy(self, version: int, model_dir: Path) -> None: ...

    def undeploy(self, version: int) -> None: ...


def switch(conn: psycopg.Connection, settings: Settings, deployer: Deployer, force: bool = False,
           lock_owner: str | None = None, expected_green: str | None = None,
           idempotency_key: str | None = None) -> dict[str, Any]:
    """Makes the (complete) green collection blue; SwitchRefused says why not. Without `force` the
    green model must have passed the quality gate. `lock_owner`: the caller already holds the lock.
    The previous blue it replaces is dropped only once the swap succeeded: a switch aborted by its
    compare-and-swap leaves the rollback target in place."""
    switch_id = blue_green.switch_id_for("switch", idempotency_key) if idempotency_key else None
    if (first := _first_call(conn, settings, switch_id)) is not None:
        return first
    owner = lock_owner or f"{SWITCH_OWNER}{uuid.uuid4().hex}"
    _acquire(conn, settings, owner)
    try:
        if (first := _first_call(conn, settings, switch_id)) is not None:
            return first  # a retry that waited for the first call's lock
        state = blue_green.get_state(conn)
        green = state.green
        if green is None:
            raise SwitchRefused("there is no green collection to switch to: run a reindex first")
        if expected_green and green.collection != expected_green:
            raise SwitchRefused(f"green is {green.collection}, not {expected_green}")
        collection = blue_green.get_collection(conn, green.collection)
        if collection["state"] != "ready":
            raise SwitchRefused(f"green collection {green.collection} is {collection['state']}: "
                                "its reindex has not finished")
        if not force and not blue_green.gate_passed(conn, green.model_version):
            raise SwitchRefused(f"model v{green.model_version} has not passed the quality gate; "
                                "switch with force to override")
        deployer.deploy(green.model_version, Path(green.source_dir))  # idempotent: Triton serves it before the switch
        record = blue_green.begin_switch(conn, "switch", state.blue, green, force, switch_id)
        done = _complete(conn, settings, record)
        if done["status"] == "switched" and state.previous is not None:
            # One rollback target at a time: the blue just replaced took the older one's place.
            retire(conn, deployer, state.previous)
        return done
    finally:
        if lock_owner is None:
            locks.release(conn, locks.LIFECYCLE, owner)


def rollback(conn: psycopg.Connection, settings: Settings, deployer: Deployer,
             idempotency_key: str | None = None) -> dict[str, Any]:
    """Makes the previous blue (kept for the grace period) blue again."""
    switch_id = blue_green.switch_id_for("rollback", idempotency_key) if idempotency_key else None
    if (first := _first_call(conn, settings, switch_id)) is not None:
        return first
    owner = f"{SWITCH_OWNER}{uuid.uuid4().hex}"
    _acquire(conn, settings, owner)
    try:
        if (first := _first_call(conn, settings, switch_id)) is not None:
            return first
        state = blue_green.get_state(conn)
        if state.previous is None:
            raise SwitchRefused("there is nothing to roll back to: no previous collection "
                                "(none was switched from, or its grace period is over)")
        deployer.deploy(state.previous.model_version, Path(state.previous.source_dir))
        record = blue_green.begin_switch(conn, "rollback", state.blue, state.previous, True, switch_id)
        return _complete(conn, settings, record)
    finally:
        locks.release(conn, locks.LIFECYCLE, owner)


def _first_call(conn: psycopg.Connection, settings: Settings, switch_id: str | None) -> dict[str, Any] | None:
    """What the call with this idempotency key did (finishing it if its driver died mid-way), or None
    when no call carried it yet."""
    record = blue_green.find_switch(conn, switch_id) if switch_id else None
    if record is None:
        return None
    log.info("lifecycle.switch_replayed", switch_id=switch_id, kind=record.kind, status=record.status)
    return _complete(conn, settings, record) if record.status == "started" else record.as_dict()


def resume(conn: psycopg.Connection, settings: Settings) -> list[dict[str, Any]]:
    """At a driver's start: finishes the switches a dead one recorded (compare-and-swap: at most once)
    and releases the switch locks it held."""
    resumed = [_complete(conn, settings, record) for record in blue_green.unfinished_switches(conn)]
    for lock in locks.all_locks(conn):
        if lock.owner.startswith(SWITCH_OWNER):
            locks.release(conn, lock.name, lock.owner)
    for record in resumed:
        log.info("lifecycle.switch_resumed", switch_id=record["switch_id"], status=record["status"])
    return resumed


def cleanup(conn: psycopg.Connection, settings: Settings, deployer: Deployer, now: bool = False) -> dict[str, Any]:
    """Drops the previous collection and unloads its model once the grace period is over (`now`: without
    waiting for it), and any ready collection nothing points to any more (a switch's displaced previous
    blue, when its driver died before dropping it); purges delete tombstones from blue when nothing is
    being reindexed."""
    report: dict[str, Any] = {"dropped": None}
    state = blue_green.get_state(conn)
    if state is None:
        return report
    due = state.previous is not None and blue_green.previous_due(conn, now, CLEANUP_MARGIN_S)
    if due or blue_green.unreferenced_ready(conn):
        owner = f"cleanup:{uuid.uuid4().hex}"
        try:
            locks.acquire(conn, locks.LIFECYCLE, owner, settings.lifecycle.lock_lease_s)
        except locks.LockHeld:
            report["busy"] = True
            return report
        try:
            orphans = [retire(conn, deployer, _target(conn, name)) for name in blue_green.unreferenced_ready(conn)]
            if orphans:
                report["orphans_dropped"] = orphans
            if due:
                report["dropped"] = drop_previous(conn, deployer, state.previous)
        finally:
            locks.release(conn, locks.LIFECYCLE, owner)
    if state.previous is not None and not due:
        report["previous_until"] = state.previous_until
        return report
    state = blue_green.get_state(conn)
    if state.green is None and state.previous is None:
        report["tombstones_purged"] = Collection(state.blue.collection, state.blue.dim).purge_tombstones(conn)
        reindex_ranges.forget(conn, state.blue.collection)
    return report


def drop_previous(conn: psycopg.Connection, deployer: Deployer, previous: blue_green.Target) -> dict[str, Any] | None:
    """Stops dual writes to the previous collection, drops it and unloads its model (if unused)."""
    if not blue_green.clear_previous(conn, previous.collection):
        return None
    return retire(conn, deployer, previous)


def retire(conn: psycopg.Connection, deployer: Deployer, target: blue_green.Target) -> dict[str, Any]:
    """Drops a collection the blue row no longer points to and unloads its model (if unused)."""
    Collection(target.collection, target.dim).drop(conn)
    blue_green.save_collection(conn, target.collection, target.model_version, "dropped")
    fusion_weights.forget(conn, target.collection)   # its row stays (names are reused): the fusion goes with it
    live = {t.model_version for t in blue_green.get_state(conn).write_targets()}
    if target.model_version not in live:
        deployer.undeploy(target.model_version)
        blue_green.set_model_state(conn, target.model_version, "retired")
    dropped = {"collection": target.collection, "model_version": target.model_version}
    log.info("lifecycle.cleaned_up", **dropped)
    return dropped


def _target(conn: psycopg.Connection, name: str) -> blue_green.Target:
    row = blue_green.get_collection(conn, name)
    model = blue_green.get_model(conn, row["model_version"])
    return blue_green.Target(model.version, name, model.dim, model.source_dir, model.max_length)


def drop_green(conn: psycopg.Connection, name: str, reason: str, state: str = "dropped") -> None:
    """Stops dual writes to a green collection and drops it with its checkpoints (a reindex to another
    version replaces it). Its model stays deployed: the caller decides."""
    blue_green.stop_green(conn, name)
    row = blue_green.get_collection(conn, name)
    if row:
        Collection(name, blue_green.get_model(conn, row["model_version"]).dim).drop(conn)
        blue_green.save_collection(conn, name, row["model_version"], state)
    reindex_ranges.forget(conn, name)
    fusion_weights.forget(conn, name)
    log.info("lifecycle.green_dropped", collection=name, reason=reason)


def abandon_green(conn: psycopg.Connection, settings: Settings, deployer: Deployer,
                  expected_green: str | None = None) -> dict[str, Any]:
    """Gives up a green collection (a failed reindex leaves it `building`, with dual writes on for
    good): dual writes stop, the collection is dropped and recorded `abandoned`, its model unloaded
    unless blue or previous use it. Refused while a reindex or switch holds the lifecycle lock. A
    retry finds green already gone and says so."""
    owner = f"abandon:{uuid.uuid4().hex}"
    _acquire(conn, settings, owner)
    try:
        state = blue_green.get_state(conn)
        green = state.green
        if green is None or (expected_green and green.collection != expected_green):
            name = expected_green or None
            row = blue_green.get_collection(conn, name) if name else None
            if row and row["state"] == "abandoned":
                return {"abandoned": name, "model_version": row["model_version"], "already": True}
            raise SwitchRefused("there is no green collection to abandon" if green is None
                                else f"green is {green.collection}, not {expected_green}")
        drop_green(conn, green.collection, reason="abandoned", state="abandoned")
        live = {t.model_version for t in blue_green.get_state(conn).write_targets()}
        if green.model_version not in live:
            deployer.undeploy(green.model_version)
        return {"abandoned": green.collection, "model_version": green.model_version, "already": False}
    finally:
        locks.release(conn, locks.LIFECYCLE, owner)


def _acquire(conn: psycopg.Connection, settings: Settings, owner: str) -> None:
    try:
        locks.acquire(conn, locks.LIFECYCLE, owner, settings.lifecycle.lock_lease_s)
    except locks.LockHeld as err:
        raise SwitchRefused(f"{err}: one reindex or switch at a time") from None


def _complete(conn: psycopg.Connection, settings: Settings, record: blue_green.Switch) -> dict[str, Any]:
    if settings.lifecycle.switch_pause_s:
        time.sleep(settings.lifecycle.switch_pause_s)  # fault-injection window (tests)
    done = blue_green.complete_switch(conn, record, settings.lifecycle.grace_s)
    if done.status == "switched":
        metrics.count("es_ray_switches", kind=done.kind)
        metrics.set_gauge("es_ray_blue_model_version", done.to_version)
    log.info("lifecycle.switched" if done.status == "switched" else "lifecycle.switch_aborted",
             kind=done.kind, switch_id=done.switch_id, from_collection=done.from_collection,
             to_collection=done.to_collection, status=done.status, reason=done.reason)
    return done.as_dict()
