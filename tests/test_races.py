"""Races and half-done work that lost or brought back data (issue 16), on the real Postgres without Ray:
retried switches and rollbacks, a switch that aborts, a green a failed reindex left, adjusted vectors
written over an item rewritten meanwhile, learning that never reached green, a user forgotten only in
blue."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from es_ray.config import LifecycleSettings
from es_ray.improve import forgetting
from es_ray.improve.loop import Follower, improve_once, improvement_lock, learning_from
from es_ray.lifecycle import switching
from es_ray.lifecycle.reindex import handed_over_evidence
from es_ray.store import blue_green, clickstream, db, locks, user_evidence
from es_ray.store.clickstream import Provenance
from es_ray.store.collections import Collection, next_versions
from tests.test_lifecycle_store import item
from tests.test_switching import RecordingDeployer, blue_green_previous, pass_gate

COLLECTIONS = ("c1", "c2", "c3")


@pytest.fixture()
def dsn(scratch_database):
    """A database of its own: models v1-v3, blue c1, green c2 (built), c3 building."""
    dsn = scratch_database("esr_races")
    db.migrate(dsn)
    with db.connect(dsn) as connection:
        for v, name in enumerate(COLLECTIONS, start=1):
            blue_green.save_model(connection, blue_green.ModelRecord(v, f"models:/m/{v}", f"/models/v{v}", 3, 8))
            Collection(name, 3).create(connection)
            blue_green.save_collection(connection, name, v, "ready" if v < 3 else "building")
        blue_green.set_blue(connection, 1, "c1")
        blue_green.set_green(connection, 2, "c2")
    return dsn


@pytest.fixture()
def conn(dsn):
    with db.connect(dsn) as connection:
        yield connection


@pytest.fixture()
def quick(settings):
    return settings.model_copy(update={"lifecycle": LifecycleSettings(grace_s=3600, lock_lease_s=30, switch_pause_s=0)})


def keep_as_previous(conn, name: str, version: int) -> None:
    """As if `name` had been blue before c1 and is kept for rollback."""
    blue_green.save_collection(conn, name, version, "ready")
    conn.execute("""UPDATE blue SET previous_version = %s, previous_collection = %s,
                    previous_until = now() + interval '1 hour'""", (version, name))


# --- switch and rollback retried by Ray; a switch that aborts; a green nobody finishes ---------------------

def test_a_retried_rollback_answers_with_the_first_instead_of_rolling_back_again(conn, quick):
    deployer = RecordingDeployer()
    pass_gate(conn, 2)
    switched = switching.switch(conn, quick, deployer, idempotency_key="switch-1")
    first = switching.rollback(conn, quick, deployer, idempotency_key="rollback-1")
    assert blue_green_previous(conn) == ("c1", None, "c2")
    # The driver died after the rollback; Ray calls it again with the same arguments.
    assert switching.rollback(conn, quick, deployer, idempotency_key="rollback-1") == first
    assert blue_green_previous(conn) == ("c1", None, "c2")                # not back on the bad version
    assert switching.switch(conn, quick, deployer, idempotency_key="switch-1") == switched  # green is gone: still answered
    assert len(blue_green.recent_switches(conn)) == 2
    again = switching.rollback(conn, quick, deployer, idempotency_key="rollback-2")  # another key: another rollback
    assert again["status"] == "switched" and blue_green_previous(conn) == ("c2", None, "c1")


def test_a_keyed_switch_whose_driver_died_mid_way_is_finished_by_its_retry(conn, quick):
    state = blue_green.get_state(conn)
    recorded = blue_green.begin_switch(conn, "switch", state.blue, state.green, True,
                                       blue_green.switch_id_for("switch", "k"))  # then the driver died
    done = switching.switch(conn, quick, RecordingDeployer(), force=True, idempotency_key="k")
    assert (done["switch_id"], done["status"]) == (recorded.switch_id, "switched")
    assert blue_green_previous(conn) == ("c2", None, "c1")
    assert len(blue_green.recent_switches(conn)) == 1


def test_a_switch_aborted_by_its_compare_and_swap_keeps_the_previous_blue(conn, quick, monkeypatch):
    keep_as_previous(conn, "c3", 3)
    deployer = RecordingDeployer()
    recorded = blue_green.begin_switch

    def then_the_state_moves(*args, **kwargs):
        record = recorded(*args, **kwargs)
        blue_green.stop_green(conn, "c2")  # whatever moved it: the swap must find it and abort
        return record

    monkeypatch.setattr(blue_green, "begin_switch", then_the_state_moves)
    done = switching.switch(conn, quick, deployer, force=True)
    assert done["status"] == "aborted"
    assert blue_green_previous(conn) == ("c1", None, "c3")                # the rollback target is still there
    assert Collection("c3", 3).exists(conn) and ("undeploy", 3) not in deployer.calls


def test_a_switch_drops_the_older_previous_after_the_swap_or_cleanup_does(conn, quick):
    keep_as_previous(conn, "c3", 3)
    deployer = RecordingDeployer()
    done = switching.switch(conn, quick, deployer, force=True)
    assert done["status"] == "switched" and blue_green_previous(conn) == ("c2", None, "c1")
    assert not Collection("c3", 3).exists(conn) and deployer.calls == [("deploy", 2), ("undeploy", 3)]

    # A driver that died between the swap and the drop: the next cleanup drops what nothing points to.
    switching.rollback(conn, quick, deployer)
    keep_as_previous(conn, "c3", 3)
    Collection("c3", 3).create(conn)
    state = blue_green.get_state(conn)
    blue_green.save_collection(conn, "c2", 2, "ready")
    conn.execute("UPDATE blue SET green_version = 2, green_collection = 'c2'")
    blue_green.begin_switch(conn, "switch", state.blue, blue_green.get_state(conn).green, True)
    assert [r["status"] for r in switching.resume(conn, quick)] == ["switched"]
    assert blue_green_previous(conn) == ("c2", None, "c1") and Collection("c3", 3).exists(conn)
    switching.cleanup(conn, quick, deployer)
    assert not Collection("c3", 3).exists(conn) and blue_green.get_collection(conn, "c3")["state"] == "dropped"
    assert Collection("c1", 3).exists(conn)                               # the previous blue stays for its grace


def test_a_green_left_by_a_failed_reindex_is_abandoned(conn, quick):
    deployer = RecordingDeployer()
    blue_green.set_green(conn, 3, "c3")                                   # a reindex to v3 died half-way
    locks.acquire(conn, locks.LIFECYCLE, "reindex:running", 30)
    with pytest.raises(switching.SwitchRefused, match="one reindex or switch at a time"):
        switching.abandon_green(conn, quick, deployer)                    # not while a reindex runs
    locks.release(conn, locks.LIFECYCLE, "reindex:running")

    done = switching.abandon_green(conn, quick, deployer, expected_green="c3")
    assert done == {"abandoned": "c3", "model_version": 3, "already": False}
    assert [t.collection for t in blue_green.get_state(conn).write_targets()] == ["c1"]  # dual writes off
    assert not Collection("c3", 3).exists(conn)
    assert blue_green.get_collection(conn, "c3")["state"] == "abandoned"
    assert deployer.calls == [("undeploy", 3)] and locks.get(conn, locks.LIFECYCLE) is None
    assert switching.abandon_green(conn, quick, deployer, expected_green="c3")["already"] is True
    with pytest.raises(switching.SwitchRefused, match="no green collection"):
        switching.abandon_green(conn, quick, deployer)


# --- adjusted vectors never land on an item rewritten since they were read -------------------------------

def test_adjusted_vectors_are_not_written_over_an_item_rewritten_since_the_read(dsn, conn):
    blue = Collection("c1", 3)
    blue.upsert(conn, [item("a", "old text"), item("b", "other")])
    read = blue.chunk_vectors(conn, ["a", "b"], model=True)
    blue.upsert(conn, [item("a", "new text")])                            # between the pass's read and write
    new_model = blue.chunk_vectors(conn, ["a"], model=True)["a"]
    adjusted = [(o, p, -v) for o, chunks in read.items() for p, v in chunks]
    with conn.transaction():
        blue.save_global(conn, adjusted, read.versions)
        blue.save_user(conn, "u1", adjusted, read.versions)
    seen = blue.chunk_vectors(conn, ["a"], "u1")["a"]
    assert np.allclose(seen[0][1], new_model[0][1])                       # the new text's vectors, untouched
    assert blue.adjusted(conn, ["a", "b"]) == {"b"}                       # b was not rewritten: written

    # An item a writer holds right now is skipped, not waited for (a wait could deadlock with it).
    read = blue.chunk_vectors(conn, ["b"], model=True)
    with db.connect(dsn) as writer, writer.transaction():
        writer.execute("SELECT 1 FROM items_c1 WHERE object_id = 'b' FOR UPDATE")
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '3s'")                  # a wait fails here, not hangs
            blue.save_user(conn, "u2", [("b", 1, np.ones(3))], read.versions)
    assert conn.execute("SELECT count(*) FROM user_parts_c1 WHERE user_id = 'u2'").fetchone()[0] == 0


# --- a user forgotten everywhere; learning reaches green ---------------------------------------------------

def session(conn, user_id: str | None, shown: list[str], clicked: str, client: str = "127.0.0.2") -> str:
    session_id = f"s-{user_id}-{time.monotonic_ns()}"
    clickstream.record_session(conn, session_id, user_id, "volcano ash", 1, list(enumerate(shown, start=1)),
                               Provenance("served", client=client))
    clickstream.add_events(conn, session_id, [(f"e-{session_id}", clicked, "click")])
    return session_id


def embed(texts: list[str]) -> np.ndarray:
    """A query encoder for the test: a fixed direction per text."""
    vectors = np.stack([np.random.default_rng(sum(map(ord, t))).normal(size=3) for t in texts]).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def user_vectors(conn, user_id: str) -> dict[str, int]:
    return {name: conn.execute(f"SELECT count(*) FROM user_parts_{name} WHERE user_id = %s",
                               (user_id,)).fetchone()[0] for name in COLLECTIONS}


def load_everywhere(conn, ids: list[str]) -> None:
    versions = dict(zip(ids, next_versions(conn, len(ids))))
    for name in COLLECTIONS:
        Collection(name, 3).upsert(conn, [item(i, f"text {i}") for i in ids], versions)


def test_forgetting_a_user_reaches_every_collection_and_their_sessions(dsn, conn):
    keep_as_previous(conn, "c3", 3)
    load_everywhere(conn, ["a", "b"])
    for user in ("u1", "u2"):
        session(conn, user, ["a", "b"], "b")
        for name in COLLECTIONS:
            Collection(name, 3).save_user(conn, user, [("b", 1, np.ones(3))])
    clickstream.mark_improved(conn, [s.session_id for s in clickstream.recent_sessions(conn, 10)])
    user_evidence.record(conn, [user_evidence.TaughtSession(user, "served", "q", [user_evidence.Lesson("b", "clicked")])
                                for user in ("u1", "u2")])

    # A pass on green is half-way (it holds green's lock and wrote u1's vectors): forgetting waits for it.
    with db.connect(dsn) as other:
        other.execute("BEGIN")
        locks.transaction_lock(other, improvement_lock(Collection("c2", 3)))
        Collection("c2", 3).save_user(other, "u1", [("a", 1, np.ones(3))])
        answer = {}
        forgetting_thread = threading.Thread(target=lambda: answer.update(forgetting.forget_user(conn, "u1")))
        forgetting_thread.start()
        time.sleep(1.0)
        assert forgetting_thread.is_alive()
        other.execute("COMMIT")
        forgetting_thread.join(30)
    assert answer["vectors_by_collection"] == {"c1": 1, "c2": 2, "c3": 1} and answer["deleted_sessions"] == 1
    assert user_vectors(conn, "u1") == {"c1": 0, "c2": 0, "c3": 0}        # a rollback brings nothing back
    assert user_vectors(conn, "u2") == {"c1": 1, "c2": 1, "c3": 1}
    replayed, _ = clickstream.improved_user_sessions(conn, None, 100)
    assert {s.user_id for s in replayed} == {"u2"}                        # no replay, no fine-tune learns u1
    assert {s.user_id for s in clickstream.recent_sessions(conn, 100)} == {"u2"}
    assert user_evidence.remembered_users(conn, ["u1", "u2"]) == {"u2"}  # nor a reindex from the counts


def test_a_pass_teaches_green_too_without_doubling_what_its_replay_teaches(dsn, conn, settings):
    load_everywhere(conn, ["a", "b", "c"])
    blue, green = Collection("c1", 3), Collection("c2", 3)
    blue_green.save_collection(conn, "c2", 2, "building")                 # green is still loading
    learning = learning_from(settings)
    for k in range(3):
        session(conn, None, ["a", "b", "c"], "c", client=f"127.0.0.{k + 2}")
    early = session(conn, "u1", ["a", "b", "c"], "c")
    time.sleep(0.05)
    improve_once(conn, blue, embed, learning, settle_s=0, followers=[Follower(green, embed)])
    assert blue.adjusted(conn, ["a", "b", "c"]) == green.adjusted(conn, ["a", "b", "c"]) == {"c"}  # memories: both
    assert user_vectors(conn, "u1")["c2"] == 0                            # users: green's replay teaches them

    green_target = SimpleNamespace(collection="c2", dim=3)
    with handed_over_evidence(SimpleNamespace(postgres_dsn=dsn), conn, green_target) as replay_reads:
        late = session(conn, "u1", ["a", "b", "c"], "b")
        improve_once(conn, blue, embed, learning, settle_s=0, followers=[Follower(green, embed)])
        assert user_vectors(conn, "u1")["c2"] >= 1                        # learned after the hand-over: on green
        counted_now, _ = user_evidence.page(conn, None, 100)
        replayed, _ = user_evidence.page(replay_reads, None, 100)
    assert late != early and sum(g.sessions for g in counted_now) == 2
    assert sum(g.sessions for g in replayed) == 1                         # the replay takes only the earlier one
    blue_green.save_collection(conn, "c2", 2, "building")                 # a new build of it starts over
    assert blue_green.users_learned_since(conn, "c2") is None
