"""Lifecycle storage on the real Postgres: versioned copies and tombstones, and leased locks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from es_ray import retries
from es_ray.store import blue_green, db, locks
from es_ray.store.collections import Collection, EmbeddedItem, next_versions


def item(item_id: str, text: str, dim: int = 3) -> EmbeddedItem:
    vector = np.random.default_rng(abs(hash(text)) % 2**32).normal(size=(1, dim)).astype(np.float32)
    return EmbeddedItem(item_id, {"text": text}, vector / np.linalg.norm(vector), {"text_sha256": text}, text)


@pytest.fixture()
def conn(stack):
    with db.connect(stack.postgres_dsn) as connection:
        yield connection


@pytest.fixture()
def collection(conn):
    collection = Collection("t_versions", 3)
    collection.drop(conn)
    collection.create(conn)
    yield collection
    collection.drop(conn)


def texts(conn, collection, ids):
    return {k: v["payload"]["text"] for k, v in collection.get(conn, ids).items()}


def test_an_older_copy_never_overwrites_a_newer_write_nor_revives_a_delete(conn, collection):
    old, new, gone = next_versions(conn, 3)
    assert old < new < gone
    assert collection.upsert(conn, [item("a", "new text")], {"a": new}) == 1
    assert collection.upsert(conn, [item("a", "old copy")], {"a": old}) == 0        # a reindex copy arriving late
    assert texts(conn, collection, ["a"]) == {"a": "new text"}

    assert collection.delete(conn, ["a"], {"a": gone}) == 1
    assert collection.upsert(conn, [item("a", "new text")], {"a": new}) == 0        # the tombstone wins
    assert collection.get(conn, ["a"]) == {} and collection.count(conn) == 0
    assert collection.delete(conn, ["never-seen"]) == 0                             # a tombstone, nothing deleted

    assert collection.upsert(conn, [item("a", "written again")]) == 1               # a newer write brings it back
    assert texts(conn, collection, ["a"]) == {"a": "written again"}
    assert collection.purge_tombstones(conn) == 1                                   # never-seen's tombstone


def test_concurrent_writes_and_late_copies_end_in_the_newest_state(stack, settings, collection):
    """Writers upsert and delete while a 'reindex' keeps copying old versions: every id ends as its last write.

    Each write goes through the retry policy its real caller uses (the dual write's, the reindex's): rows
    that another writer commits mid-transaction can deadlock two writers, and Postgres then rolls one back
    whole, which the policy runs again."""
    ids = [f"id-{i}" for i in range(30)]
    final: dict[str, tuple[int, str | None]] = {}
    lock = threading.Lock()
    errors = []

    def writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with db.connect(stack.postgres_dsn) as c:
            for n in range(60):
                chosen = sorted(set(rng.choice(ids, 3).tolist()))
                try:
                    versions = dict(zip(chosen, next_versions(c, len(chosen))))
                    if rng.random() < 0.4:
                        retries.retrying(settings.retries.write, "test.delete")(collection.delete, c, chosen, versions)
                        update = {i: (versions[i], None) for i in chosen}
                    else:
                        written = [item(i, f"{i} by {seed} #{n}") for i in chosen]
                        retries.retrying(settings.retries.write, "test.upsert")(collection.upsert, c, written, versions)
                        update = {i: (versions[i], f"{i} by {seed} #{n}") for i in chosen}
                    with lock:
                        for i, (v, t) in update.items():
                            if v > final.get(i, (0, None))[0]:
                                final[i] = (v, t)
                except Exception as err:  # noqa: BLE001 - collected and asserted below
                    errors.append(err)

    with db.connect(stack.postgres_dsn) as c:
        stale = next_versions(c, 1)[0]              # older than anything the writers write

    def late_copier() -> None:
        copy = retries.retrying(settings.retries.reindex_write, "test.copy")
        try:
            with db.connect(stack.postgres_dsn) as c:
                for _ in range(20):
                    copy(collection.upsert, c, [item(i, "stale copy") for i in ids], {i: stale for i in ids})
        except Exception as err:  # noqa: BLE001 - collected and asserted below, as the writers' are
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)] + [threading.Thread(target=late_copier)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.connect(stack.postgres_dsn) as c:
        stored = texts(c, collection, ids)
    expected = {i: t for i, (_, t) in final.items() if t is not None}
    untouched = {i: "stale copy" for i in ids if i not in final}
    assert stored == {**expected, **untouched}


def test_a_lock_has_one_owner_until_released_or_expired(conn):
    conn.execute("DELETE FROM locks WHERE name = 'test-lock'")
    held = locks.acquire(conn, "test-lock", "alice", lease_s=30)
    assert held.owner == "alice"
    with pytest.raises(locks.LockHeld, match="alice"):
        locks.acquire(conn, "test-lock", "bob", lease_s=30)
    assert locks.acquire(conn, "test-lock", "alice", lease_s=30).acquired_at == held.acquired_at   # re-entrant
    assert locks.renew(conn, "test-lock", "alice", lease_s=0.2)
    assert not locks.renew(conn, "test-lock", "bob", lease_s=30)
    time.sleep(0.4)                                                   # alice died: her lease runs out
    assert locks.acquire(conn, "test-lock", "bob", lease_s=30).owner == "bob"
    assert not locks.release(conn, "test-lock", "alice")
    assert locks.release(conn, "test-lock", "bob")
    assert locks.get(conn, "test-lock") is None


def test_a_reindex_range_records_failed_items_with_their_stage_and_is_redone(stack, settings, conn):
    """An item without a stored text fails at `read`; its range stays to do until a rerun succeeds."""
    import ray

    from es_ray.lifecycle.reindex import ReindexWorker
    from es_ray.store.reindex_ranges import failures
    from es_ray.store import blue_green

    blue = blue_green.get_blue(conn)
    source, green = Collection("t_reindex_src", blue.dim), Collection("t_reindex_green", blue.dim)
    for collection in (source, green):
        collection.drop(conn)
        collection.create(conn)
    conn.execute("DELETE FROM reindex_failures WHERE collection = %s", (green.name,))
    conn.execute("DELETE FROM reindex_ranges WHERE collection = %s", (green.name,))
    conn.execute("INSERT INTO reindex_ranges (collection, range_no) VALUES (%s, 0)", (green.name,))
    source.upsert(conn, [item(f"r-{i}", f"text {i}", blue.dim) for i in range(5)])
    conn.execute("UPDATE items_t_reindex_src SET text = NULL WHERE object_id = 'r-3'")   # written by an old es-ray

    worker = ReindexWorker(settings.model_dump(mode="json"), stack.triton_grpc_url, stack.postgres_dsn,
                           {**blue.__dict__, "collection": source.name}, {**blue.__dict__, "collection": green.name},
                           "test-task")
    assert not ray.is_initialized(), "the stage, called outside Ray, started a local Ray instance"
    assert worker.reindex_range(0, None, None) == (5, 4, 1)          # read, written, failed
    count, sample = failures(conn, green.name)
    assert count == 1 and (sample[0]["id"], sample[0]["stage"]) == ("r-3", "read")
    assert "no stored text" in sample[0]["error"]
    assert conn.execute("SELECT done_at FROM reindex_ranges WHERE collection = %s", (green.name,)).fetchone()[0] is None

    source.upsert(conn, [item("r-3", "text 3", blue.dim)])           # written again, with its text
    assert worker.reindex_range(0, None, None) == (5, 1, 0)          # the others are already there
    assert failures(conn, green.name) == (0, [])
    assert conn.execute("SELECT done_at FROM reindex_ranges WHERE collection = %s", (green.name,)).fetchone()[0]
    assert source.differences(conn, green)["missing"] == 0
    for collection in (source, green):
        collection.drop(conn)


@pytest.fixture()
def scratch_dsn(scratch_database):
    """A migrated database of its own, for races on the blue row itself."""
    dsn = scratch_database("esr_blue_race")
    db.migrate(dsn)
    return dsn


def test_a_write_waiting_on_a_switch_reads_the_new_blue(scratch_dsn):
    with db.connect(scratch_dsn) as switcher, db.connect(scratch_dsn) as writer:
        for v in (1, 2):
            switcher.execute("INSERT INTO models (version, mlflow_uri, source_dir, dim, max_length) "
                             "VALUES (%s, '', '', 3, 8)", (v,))
            switcher.execute("INSERT INTO collections (name, model_version) VALUES (%s, %s)", (f"v{v}", v))
        switcher.execute("INSERT INTO blue (model_version, collection) VALUES (1, 'v1')")
        seen = []

        def write():
            with writer.transaction():
                seen.append(blue_green.get_state(writer, lock=True))

        with switcher.transaction():
            switcher.execute("UPDATE blue SET model_version = 2, collection = 'v2', epoch = epoch + 1")
            thread = threading.Thread(target=write)
            thread.start()
            time.sleep(0.5)                      # the write waits for the switch's row lock
            assert not seen
        thread.join(timeout=10)
        assert seen and seen[0] is not None, "the write lost the lifecycle state while a switch committed"
        assert (seen[0].blue.model_version, seen[0].blue.collection, seen[0].epoch) == (2, "v2", 1)
