"""Upgrades in place: a state dir made by an earlier es-ray starts with this one. Its database (the control
schema of commit 8ba3954, the first with blue/green, and a collection in the first release's layout, with
data in both) is migrated by `db.migrate` and `Collection.create`, as `es-ray up` does, and keeps its data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg
import pytest

from es_ray.store import clickstream, db, blue_green
from es_ray.store.collections import Collection

OLD_SCHEMA = Path(__file__).parent / "fixtures" / "schema-8ba3954.sql"


@pytest.fixture()
def old_dsn(scratch_database):
    dsn = scratch_database("esr_upgrade")
    with psycopg.connect(dsn, autocommit=True) as conn:  # plain: the vector type does not exist yet
        conn.execute(OLD_SCHEMA.read_text())
        conn.execute("""INSERT INTO models (version, mlflow_uri, source_dir, dim, max_length, state)
                        VALUES (1, 'models:/m/1', '/models/v1', 3, 16, 'deployed')""")
        conn.execute("INSERT INTO collections (name, model_version, state) VALUES ('v1', 1, 'ready')")
        conn.execute("INSERT INTO blue (model_version, collection) VALUES (1, 'v1')")
        conn.execute("""INSERT INTO sessions (session_id, query, model_version, created_at)
                        VALUES ('s1', 'old query', 1, now() - interval '1 day')""")
        conn.execute("INSERT INTO session_results (session_id, rank, object_id) VALUES ('s1', 1, 'a'), ('s1', 2, 'b')")
        conn.execute("INSERT INTO events (event_id, session_id, object_id, type) VALUES ('e1', 's1', 'b', 'click')")
        # A session recorded through POST /v1/sessions (no model), which anyone could call back then.
        conn.execute("""INSERT INTO sessions (session_id, query, created_at)
                        VALUES ('s2', 'posted query', now() - interval '2 days')""")
        conn.execute("INSERT INTO session_results (session_id, rank, object_id) VALUES ('s2', 1, 'c')")
        # The first release's collection layout: no text, tombstones or model-vector column yet.
        conn.execute("""CREATE TABLE items_v1 (object_id text PRIMARY KEY, payload jsonb NOT NULL DEFAULT '{}',
                                               source jsonb NOT NULL DEFAULT '{}', version bigint NOT NULL,
                                               updated_at timestamptz NOT NULL DEFAULT now());
                        CREATE TABLE parts_v1 (object_id text NOT NULL REFERENCES items_v1 ON DELETE CASCADE,
                                               part_no integer NOT NULL, is_average boolean NOT NULL,
                                               vector vector(3) NOT NULL, PRIMARY KEY (object_id, part_no));
                        INSERT INTO items_v1 (object_id, payload, version) VALUES ('a', '{"lang": "en"}', 1);
                        INSERT INTO parts_v1 VALUES ('a', 0, false, '[1, 0, 0]')""")
        # A collection of a later release, with the items' text (but no lexical index yet).
        conn.execute("INSERT INTO collections (name, model_version, state) VALUES ('v9', 1, 'dropped')")
        conn.execute("""CREATE TABLE items_v9 (object_id text PRIMARY KEY, payload jsonb NOT NULL DEFAULT '{}',
                                               version bigint NOT NULL, text text);
                        INSERT INTO items_v9 (object_id, version, text) VALUES ('z', 1, 'Zebras crossing roads'),
                                                                              ('y', 2, NULL)""")
    return dsn


def test_a_database_of_an_earlier_release_is_migrated_and_keeps_its_data(old_dsn):
    latest = db.migrations()[-1][0]
    assert db.migrate(old_dsn) == list(range(1, latest + 1))
    assert db.migrate(old_dsn) == []                                     # each migration once
    with db.connect(old_dsn) as conn:
        assert db.schema_version(conn) == latest
        state = blue_green.get_state(conn)
        assert (state.blue.model_version, state.blue.collection, state.green, state.epoch) == (1, "v1", None, 0)
        sessions = {s.session_id: s for s in clickstream.recent_sessions(conn, 10)}
        session = sessions["s1"]
        assert (session.query, session.shown, session.clicked) == ("old query", [(1, "a"), (2, "b")], {"b"})
        # Who recorded them, as far as it can be told: search set a model version, POST /v1/sessions did not.
        assert {(s.session_id, s.source, s.client) for s in sessions.values()} == {("s1", "served", None),
                                                                                    ("s2", "unverified", None)}
        assert [s.session_id for s in clickstream.recent_sessions(conn, 10, ["unverified"])] == ["s1"]
        assert clickstream.add_events(conn, "s2", [("e1", "c", "click")]) == (1, 0)  # event ids: per session now
        old = clickstream.get_session(conn, "s1")
        assert old.swapped_rank is None                                   # a column the old schema lacked
        assert (old.mode, old.list_ranks) == (None, {"a": (None, None), "b": (None, None)})  # nor these (migration 9)
        assert conn.execute("SELECT count(*) FROM click_evidence").fetchone()[0] == 0  # a table it lacked

        collection = Collection("v1", 3)
        collection.create(conn)                                          # what `es-ray up` runs on live collections
        [(part_no, vector)] = collection.chunk_vectors(conn, ["a"], model=True)["a"]
        assert part_no == 0 and np.allclose(vector, [1, 0, 0])
        assert collection.count(conn) == 1
        item = collection.read_range(conn, None, None)[0]
        assert (item.id, item.payload, item.text) == ("a", {"lang": "en"}, None)   # text: not stored back then
        # The lexical index: made for the collection with text by migration 8, for the oldest by create.
        assert conn.execute("SELECT object_id FROM items_v9 WHERE lexical @@ plainto_tsquery('english', 'zebra')"
                            ).fetchall() == [("z",)]
        assert conn.execute("SELECT count(*) FROM items_v1 WHERE lexical = ''::tsvector").fetchone()[0] == 1
        assert conn.execute("SELECT to_regclass('items_v9_lexical') IS NOT NULL AND "
                            "to_regclass('items_v1_lexical') IS NOT NULL").fetchone()[0]
