"""Switch, rollback, cleanup and resume as plain functions on the real Postgres, without Ray: the blue
row, the switches log, the lifecycle lock and what is asked of Triton (recorded by the deployer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from es_ray.config import LifecycleSettings
from es_ray.lifecycle import switching
from es_ray.store import db, blue_green, locks
from es_ray.store.collections import Collection


class RecordingDeployer:
    """What the switch asks of Triton, in order (loading models is tested with the real Triton elsewhere)."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def deploy(self, version: int, model_dir: Path) -> None:
        self.calls.append(("deploy", version))

    def undeploy(self, version: int) -> None:
        self.calls.append(("undeploy", version))


@pytest.fixture()
def conn(scratch_database):
    """A database of its own on the stack's Postgres, with models v1-v3, blue v1 and green v2 (built)."""
    dsn = scratch_database("esr_switching")
    db.migrate(dsn)
    with db.connect(dsn) as connection:
        for v in (1, 2, 3):
            blue_green.save_model(connection, blue_green.ModelRecord(v, f"models:/m/{v}", f"/models/v{v}", 3, 8))
            Collection(f"c{v}", 3).create(connection)
            blue_green.save_collection(connection, f"c{v}", v, "ready" if v < 3 else "building")
        blue_green.set_blue(connection, 1, "c1")
        blue_green.set_green(connection, 2, "c2")
        yield connection


@pytest.fixture()
def quick(settings):
    """No fault-injection pause, a long grace period, a short lease."""
    return settings.model_copy(update={"lifecycle": LifecycleSettings(grace_s=3600, lock_lease_s=30, switch_pause_s=0)})


def pass_gate(conn, version: int) -> None:
    blue_green.set_model_state(conn, version, "candidate")
    blue_green.record_lineage(conn, version, 1, {"ndcg@10": 0.5}, {"candidate": True, "reason": "better"})


def blue_green_previous(conn) -> tuple:
    state = blue_green.get_state(conn)
    return tuple(t.collection if t else None for t in (state.blue, state.green, state.previous))


def test_switch_needs_the_gate_then_keeps_the_old_blue_for_rollback(conn, quick):
    deployer = RecordingDeployer()
    with pytest.raises(switching.SwitchRefused, match="has not passed the quality gate"):
        switching.switch(conn, quick, deployer)
    assert blue_green_previous(conn) == ("c1", "c2", None)
    assert locks.get(conn, locks.LIFECYCLE) is None                     # a refusal releases the lock

    pass_gate(conn, 2)
    done = switching.switch(conn, quick, deployer)
    assert (done["status"], done["from_version"], done["to_version"]) == ("switched", 1, 2)
    assert blue_green_previous(conn) == ("c2", None, "c1")
    assert deployer.calls == [("deploy", 2)]                            # Triton serves v2 before the swap
    assert blue_green.get_model(conn, 2).state == "deployed"

    back = switching.rollback(conn, quick, deployer)
    assert (back["kind"], back["status"], back["to_version"]) == ("rollback", "switched", 1)
    assert blue_green_previous(conn) == ("c1", None, "c2")
    with pytest.raises(switching.SwitchRefused, match="no green collection"):
        switching.switch(conn, quick, deployer, force=True)


def test_a_switch_refuses_an_unfinished_green_or_a_held_lock(conn, quick):
    deployer = RecordingDeployer()
    blue_green.set_green(conn, 3, "c3")                                  # still building
    with pytest.raises(switching.SwitchRefused, match="its reindex has not finished"):
        switching.switch(conn, quick, deployer, force=True)
    blue_green.save_collection(conn, "c3", 3, "ready")
    with pytest.raises(switching.SwitchRefused, match="green is c3, not c2"):
        switching.switch(conn, quick, deployer, force=True, expected_green="c2")
    locks.acquire(conn, locks.LIFECYCLE, "reindex:other", 30)
    with pytest.raises(switching.SwitchRefused, match="one reindex or switch at a time"):
        switching.switch(conn, quick, deployer, force=True)
    assert locks.get(conn, locks.LIFECYCLE).owner == "reindex:other"    # someone else's lock is left alone
    done = switching.switch(conn, quick, deployer, force=True, lock_owner="reindex:other")  # the holder may
    assert done["status"] == "switched" and done["forced"]
    assert locks.get(conn, locks.LIFECYCLE).owner == "reindex:other"    # and keeps its lock
    assert deployer.calls == [("deploy", 3)]


def test_cleanup_drops_the_previous_blue_only_when_due(conn, quick, monkeypatch):
    deployer = RecordingDeployer()
    pass_gate(conn, 2)
    switching.switch(conn, quick, deployer)
    report = switching.cleanup(conn, quick, deployer)
    assert report["dropped"] is None and report["previous_until"] is not None  # grace period not over
    assert Collection("c1", 3).exists(conn)

    monkeypatch.setattr(switching, "CLEANUP_MARGIN_S", 0.0)
    report = switching.cleanup(conn, quick, deployer, now=True)
    assert report["dropped"] == {"collection": "c1", "model_version": 1}
    assert "tombstones_purged" in report                                 # nothing left to dual-write
    assert not Collection("c1", 3).exists(conn)
    assert blue_green_previous(conn) == ("c2", None, None)
    assert deployer.calls == [("deploy", 2), ("undeploy", 1)]
    assert blue_green.get_model(conn, 1).state == "retired"
    assert blue_green.get_collection(conn, "c1")["state"] == "dropped"
    with pytest.raises(switching.SwitchRefused, match="nothing to roll back to"):
        switching.rollback(conn, quick, deployer)


def test_a_switch_recorded_by_a_dead_driver_is_finished_once(conn, quick):
    state = blue_green.get_state(conn)
    record = blue_green.begin_switch(conn, "switch", state.blue, state.green, True)  # then the driver died
    locks.acquire(conn, locks.LIFECYCLE, f"{switching.SWITCH_OWNER}dead", 30)
    resumed = switching.resume(conn, quick)
    assert [(r["switch_id"], r["status"]) for r in resumed] == [(record.switch_id, "switched")]
    assert blue_green_previous(conn) == ("c2", None, "c1")
    assert locks.get(conn, locks.LIFECYCLE) is None                     # the dead driver's lock is released
    assert switching.resume(conn, quick) == []                           # at most once


def test_dropping_a_replaced_green_stops_its_dual_writes(conn):
    switching.drop_green(conn, "c2", reason="replaced by a reindex to v3")
    assert blue_green_previous(conn) == ("c1", None, None)
    assert not Collection("c2", 3).exists(conn)
    assert blue_green.get_collection(conn, "c2")["state"] == "dropped"
