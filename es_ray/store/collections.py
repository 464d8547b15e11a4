"""One collection per model version: items_<name> (id, payload, version) and parts_<name> (vectors).

An item split into chunks has one part per chunk (part_no 1..n) and one average part (part_no 0,
is_average). The tables, their HNSW index over the chunk vectors, writes, reads and the click
adjustments of vectors live here; the search query over them is store/search.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import psycopg
from psycopg import sql

from es_ray.store import lexical
from es_ray.store.lexical import LexicalIndex

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


@dataclass
class EmbeddedItem:
    """An item ready to store: its chunk vectors (one row each) and its payload."""

    id: str
    payload: dict[str, Any]
    chunks: np.ndarray                       # (n_chunks, dim), L2-normalised
    source: dict[str, Any] = field(default_factory=dict)
    text: str | None = None                  # kept so a new model can re-embed the item (reindex)

    @property
    def average(self) -> np.ndarray:
        mean = self.chunks.mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-12)


@dataclass
class StoredItem:
    """An item as stored, read back for re-embedding."""

    id: str
    text: str | None
    payload: dict[str, Any]
    version: int
    source: dict[str, Any] = field(default_factory=dict)


class ChunkVectors(dict):
    """object id -> [(part no, vector)], and `versions`: each item's version when its vectors were read.
    A writer of adjusted vectors hands the versions back, so a read-modify-write never lands on an item
    rewritten in between (store the adjusted old text's vectors over the new text's)."""

    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, int] = {}


def collection_name(model_version: int) -> str:
    return f"v{int(model_version)}"


def next_versions(conn: psycopg.Connection, n: int) -> list[int]:
    """n fresh write versions from the global sequence (increasing, never reused)."""
    return [r[0] for r in conn.execute("SELECT nextval('item_write_seq') FROM generate_series(1, %s)", (n,))]


class Collection:
    """SQL for one collection's two tables. Methods take a connection so callers own transactions."""

    def __init__(self, name: str, dim: int):
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid collection name {name!r}")
        self.name, self.dim = name, dim
        self.items = sql.Identifier(f"items_{name}")
        self.parts = sql.Identifier(f"parts_{name}")
        self.user_parts = sql.Identifier(f"user_parts_{name}")

    # -- schema -------------------------------------------------------------------------------
    def create(self, conn: psycopg.Connection, m: int = 16, ef_construction: int = 64, index: bool = True,
               lexical_index: LexicalIndex = LexicalIndex()) -> None:
        """Creates the tables (idempotent) with their lexical index (store/lexical.py, maintained by
        Postgres as rows change); `index=False` leaves the HNSW index to `create_index`, for a bulk load
        that builds it once at the end."""
        conn.execute(sql.SQL("""
            CREATE TABLE IF NOT EXISTS {items} (
                object_id  text PRIMARY KEY,
                payload    jsonb NOT NULL DEFAULT '{{}}',
                source     jsonb NOT NULL DEFAULT '{{}}',
                version    bigint NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now()
            );
            CREATE TABLE IF NOT EXISTS {parts} (
                object_id  text NOT NULL REFERENCES {items} (object_id) ON DELETE CASCADE,
                part_no    integer NOT NULL,
                is_average boolean NOT NULL,
                vector     vector({dim}) NOT NULL,
                PRIMARY KEY (object_id, part_no)
            );
            -- Improvement: global adjustments change parts.vector and keep the model's vector in
            -- `original` (NULL while unadjusted); a user's adjustments live in user_parts only.
            ALTER TABLE {items} ADD COLUMN IF NOT EXISTS text_hash text;
            ALTER TABLE {parts} ADD COLUMN IF NOT EXISTS original vector({dim});
            CREATE TABLE IF NOT EXISTS {user_parts} (
                user_id    text NOT NULL,
                object_id  text NOT NULL REFERENCES {items} (object_id) ON DELETE CASCADE,
                part_no    integer NOT NULL,
                vector     vector({dim}) NOT NULL,
                updated_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (user_id, object_id, part_no)
            );
            CREATE INDEX IF NOT EXISTS {user_parts_object} ON {user_parts} (object_id);
            CREATE INDEX IF NOT EXISTS {payload_idx} ON {items} USING gin (payload jsonb_path_ops);
            -- The item's text (re-embedded by a reindex) and deletes as tombstones: a deleted item keeps
            -- its row with the delete's version, so an older copy written later cannot bring it back.
            ALTER TABLE {items} ADD COLUMN IF NOT EXISTS text text;
            ALTER TABLE {items} ADD COLUMN IF NOT EXISTS deleted boolean NOT NULL DEFAULT false;
            CREATE INDEX IF NOT EXISTS {tombstones_idx} ON {items} (object_id) WHERE deleted;
        """).format(items=self.items, parts=self.parts, dim=sql.Literal(self.dim),
                    payload_idx=sql.Identifier(f"items_{self.name}_payload"), user_parts=self.user_parts,
                    tombstones_idx=sql.Identifier(f"items_{self.name}_tombstones"),
                    user_parts_object=sql.Identifier(f"user_parts_{self.name}_object")))
        lexical.create(conn, self, lexical_index)
        if index:
            self.create_index(conn, m, ef_construction)

    def create_index(self, conn: psycopg.Connection, m: int = 16, ef_construction: int = 64,
                     concurrently: bool = False, work_mem: str | None = None) -> None:
        """The HNSW index over chunk vectors. `concurrently` (autocommit connection) lets writes go on
        while it builds; an invalid index left by an interrupted concurrent build is rebuilt. `work_mem`:
        this session's maintenance_work_mem (a build that fits in it is several times faster)."""
        name = f"parts_{self.name}_hnsw"
        if work_mem:
            conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(work_mem)))
        if concurrently and conn.execute("""SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                                            WHERE c.relname = %s""", (name,)).fetchone() == (True,):
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("""
            CREATE INDEX {concurrently} IF NOT EXISTS {hnsw_idx} ON {parts} USING hnsw (vector vector_cosine_ops)
                WITH (m = {m}, ef_construction = {efc}) WHERE NOT is_average
        """).format(parts=self.parts, hnsw_idx=sql.Identifier(name), m=sql.Literal(m),
                    efc=sql.Literal(ef_construction), concurrently=sql.SQL("CONCURRENTLY" if concurrently else "")))

    def exists(self, conn: psycopg.Connection) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"items_{self.name}",)).fetchone()[0]

    def drop(self, conn: psycopg.Connection) -> None:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {user_parts}; DROP TABLE IF EXISTS {parts}; "
                             "DROP TABLE IF EXISTS {items}")
                     .format(user_parts=self.user_parts, parts=self.parts, items=self.items))

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, conn: psycopg.Connection, items: Iterable[EmbeddedItem],
               versions: dict[str, int] | None = None) -> int:
        """Writes each item unless the collection holds a newer version of it; returns how many it wrote.

        `versions` (id -> version) come from the caller when one write goes to several collections or
        when a reindex copies an item; without them every item takes the next global version. A stored
        version at least as new (a later write, or a delete's tombstone) wins, so copies may arrive in
        any order. Rows are staged with COPY (binary for vectors), existing rows locked in id order and
        merged with one INSERT ... ON CONFLICT. A row another writer commits between the two can still
        deadlock two writers; Postgres rolls one back whole, and callers retry it (es_ray/retries.py,
        `aborted_transaction`). An item whose
        text is unchanged keeps its vectors and their learned adjustments (only the payload changes);
        new text replaces the vectors and drops every adjustment made to the old ones, and the click
        evidence about them (store/evidence.py).
        """
        by_id = {item.id: item for item in items}
        if not by_id:
            return 0
        ordered = [by_id[k] for k in sorted(by_id)]
        stage_parts = sql.Identifier(f"stage_parts_{self.dim}")
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("""
                CREATE TEMP TABLE IF NOT EXISTS stage_items (object_id text, payload jsonb, source jsonb,
                    text_hash text, text text, version bigint) ON COMMIT DELETE ROWS;
                CREATE TEMP TABLE IF NOT EXISTS {stage_parts} (object_id text, part_no integer,
                    is_average boolean, vector vector({dim})) ON COMMIT DELETE ROWS;
                CREATE TEMP TABLE IF NOT EXISTS stage_changed (object_id text PRIMARY KEY) ON COMMIT DELETE ROWS;
                CREATE TEMP TABLE IF NOT EXISTS stage_written (object_id text PRIMARY KEY) ON COMMIT DELETE ROWS;
                CREATE TEMP TABLE IF NOT EXISTS stage_retexted (object_id text PRIMARY KEY) ON COMMIT DELETE ROWS;
                -- One transaction may write several collections (dual writes): start from empty stages.
                TRUNCATE stage_items, {stage_parts}, stage_changed, stage_written, stage_retexted;
            """).format(stage_parts=stage_parts, dim=sql.Literal(self.dim)))
            if versions is None:
                versions = dict(zip((item.id for item in ordered), next_versions(conn, len(ordered))))
            with cur.copy("COPY stage_items (object_id, payload, source, text_hash, text, version) FROM STDIN") as copy:
                for item in ordered:
                    copy.write_row((item.id, json.dumps(item.payload), json.dumps(item.source),
                                    item.source.get("text_sha256"), item.text, versions[item.id]))
            with cur.copy(sql.SQL("COPY {} (object_id, part_no, is_average, vector) FROM STDIN WITH (FORMAT BINARY)")
                          .format(stage_parts)) as copy:
                copy.set_types(["text", "int4", "bool", "vector"])
                for item in ordered:
                    copy.write_row((item.id, 0, True, item.average.astype(np.float32)))
                    for part_no, vector in enumerate(item.chunks, start=1):
                        copy.write_row((item.id, part_no, False, np.asarray(vector, dtype=np.float32)))
            cur.execute(sql.SQL("""
                SELECT 1 FROM {items} WHERE object_id IN (SELECT object_id FROM stage_items)
                    ORDER BY object_id FOR UPDATE;
                INSERT INTO stage_changed (object_id)
                    SELECT s.object_id FROM stage_items s LEFT JOIN {items} i ON i.object_id = s.object_id
                    WHERE i.object_id IS NULL OR i.deleted OR s.text_hash IS NULL
                       OR i.text_hash IS DISTINCT FROM s.text_hash;
                -- An item whose text changes, or that comes back after a delete: what clicks said about
                -- the old text is forgotten too (an item new to this collection, as a reindex copies it,
                -- keeps its evidence).
                INSERT INTO stage_retexted (object_id)
                    SELECT s.object_id FROM stage_items s JOIN {items} i ON i.object_id = s.object_id
                    WHERE i.deleted OR s.text_hash IS NULL OR i.text_hash IS DISTINCT FROM s.text_hash;
                WITH written AS (
                    INSERT INTO {items} (object_id, payload, source, text_hash, text, version, deleted)
                        SELECT object_id, payload, source, text_hash, text, version, false
                        FROM stage_items ORDER BY object_id
                    ON CONFLICT (object_id) DO UPDATE
                        SET payload = EXCLUDED.payload, source = EXCLUDED.source, text_hash = EXCLUDED.text_hash,
                            text = EXCLUDED.text, version = EXCLUDED.version, deleted = false, updated_at = now()
                        WHERE {items}.version < EXCLUDED.version
                    RETURNING object_id)
                INSERT INTO stage_written SELECT object_id FROM written;
                DELETE FROM stage_changed WHERE object_id NOT IN (SELECT object_id FROM stage_written);
                DELETE FROM {user_parts} WHERE object_id IN (SELECT object_id FROM stage_changed);
                DELETE FROM click_evidence WHERE object_id IN (SELECT object_id FROM stage_retexted)
                                             AND object_id IN (SELECT object_id FROM stage_written);
                DELETE FROM {parts} WHERE object_id IN (SELECT object_id FROM stage_changed);
                INSERT INTO {parts} (object_id, part_no, is_average, vector)
                    SELECT object_id, part_no, is_average, vector FROM {stage_parts}
                    WHERE object_id IN (SELECT object_id FROM stage_changed);
            """).format(items=self.items, parts=self.parts, user_parts=self.user_parts, stage_parts=stage_parts))
            return cur.execute("SELECT count(*) FROM stage_written").fetchone()[0]

    def delete(self, conn: psycopg.Connection, ids: list[str], versions: dict[str, int] | None = None) -> int:
        """Deletes items, leaving a tombstone with the delete's version; returns how many existed."""
        ids = sorted(set(ids))
        if not ids:
            return 0
        if versions is None:
            versions = dict(zip(ids, next_versions(conn, len(ids))))
        with conn.transaction():
            # Lock every stored row (tombstones too) in id order first, as upsert does: no deadlock.
            stored = conn.execute(sql.SQL("""
                SELECT object_id, deleted FROM {items} WHERE object_id = ANY(%s) ORDER BY object_id FOR UPDATE
            """).format(items=self.items), (ids,)).fetchall()
            cur = conn.execute(sql.SQL("""
                INSERT INTO {items} (object_id, version, deleted)
                    SELECT * FROM unnest(%s::text[], %s::bigint[], %s::boolean[]) ORDER BY 1
                ON CONFLICT (object_id) DO UPDATE
                    SET deleted = true, version = EXCLUDED.version, payload = '{{}}', source = '{{}}', text = NULL,
                        text_hash = NULL, updated_at = now()
                    WHERE {items}.version < EXCLUDED.version
                RETURNING object_id
            """).format(items=self.items), (ids, [versions[i] for i in ids], [True] * len(ids)))
            removed = [r[0] for r in cur.fetchall()]
            conn.execute(sql.SQL("DELETE FROM {} WHERE object_id = ANY(%s)").format(self.user_parts), (removed,))
            conn.execute("DELETE FROM click_evidence WHERE object_id = ANY(%s)", (removed,))
            conn.execute(sql.SQL("DELETE FROM {} WHERE object_id = ANY(%s)").format(self.parts), (removed,))
            return len({r[0] for r in stored if not r[1]} & set(removed))

    def purge_tombstones(self, conn: psycopg.Connection) -> int:
        """Drops delete tombstones: only safe once no reindex copies into this collection."""
        return conn.execute(sql.SQL("DELETE FROM {} WHERE deleted").format(self.items)).rowcount

    # -- reads --------------------------------------------------------------------------------
    def hold_live(self, conn: psycopg.Connection, ids: Iterable[str]) -> set[str]:
        """Which of `ids` are live items, share-locked until the transaction ends (in id order, as upsert
        and delete lock): what is written about them meanwhile cannot outlive a concurrent delete."""
        rows = conn.execute(sql.SQL("""
            SELECT object_id FROM {items} WHERE object_id = ANY(%s) AND NOT deleted ORDER BY object_id FOR SHARE
        """).format(items=self.items), (sorted(set(ids)),)).fetchall()
        return {r[0] for r in rows}

    def count(self, conn: psycopg.Connection) -> int:
        return conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE NOT deleted").format(self.items)).fetchone()[0]

    def get(self, conn: psycopg.Connection, ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = conn.execute(sql.SQL("SELECT object_id, payload, version, text_hash FROM {} "
                                    "WHERE object_id = ANY(%s) AND NOT deleted")
                            .format(self.items), (list(ids),)).fetchall()
        return {r[0]: {"payload": r[1], "version": r[2], "text_sha256": r[3]} for r in rows}

    def texts(self, conn: psycopg.Connection, ids: list[str]) -> dict[str, str]:
        """The stored text of each live item that has one."""
        rows = conn.execute(sql.SQL("SELECT object_id, text FROM {} WHERE object_id = ANY(%s) AND NOT deleted "
                                    "AND text IS NOT NULL").format(self.items), (list(ids),)).fetchall()
        return dict(rows)

    def key_bounds(self, conn: psycopg.Connection, every: int) -> list[str]:
        """Every `every`-th item id in key order: the boundaries of reindex ranges of that many items."""
        return [r[0] for r in conn.execute(sql.SQL("""
            SELECT object_id FROM (SELECT object_id, row_number() OVER (ORDER BY object_id) AS n
                                   FROM {} WHERE NOT deleted) k
            WHERE n %% %s = 0 ORDER BY object_id""").format(self.items), (every,))]

    def read_range(self, conn: psycopg.Connection, after_id: str | None, last_id: str | None) -> list[StoredItem]:
        """Items with after_id < id <= last_id (None: unbounded), in key order."""
        rows = conn.execute(sql.SQL("""
            SELECT object_id, text, payload, version, source FROM {} WHERE NOT deleted
               AND (%(after)s::text IS NULL OR object_id > %(after)s::text)
               AND (%(last)s::text IS NULL OR object_id <= %(last)s::text)
            ORDER BY object_id""").format(self.items), {"after": after_id, "last": last_id}).fetchall()
        return [StoredItem(*r) for r in rows]

    def differences(self, conn: psycopg.Connection, other: "Collection", limit: int = 20) -> dict[str, Any]:
        """Live ids in one collection and not the other (both directions), to check a reindex is complete."""
        rows = conn.execute(sql.SQL("""
            SELECT a.object_id, b.object_id FROM (SELECT object_id FROM {a} WHERE NOT deleted) a
            FULL JOIN (SELECT object_id FROM {b} WHERE NOT deleted) b ON a.object_id = b.object_id
            WHERE a.object_id IS NULL OR b.object_id IS NULL""").format(a=self.items, b=other.items)).fetchall()
        only_here = sorted(r[0] for r in rows if r[0] is not None)
        only_there = sorted(r[1] for r in rows if r[1] is not None)
        return {"missing": len(only_here), "extra": len(only_there), "missing_ids": only_here[:limit],
                "extra_ids": only_there[:limit]}

    def sample_ids(self, conn: psycopg.Connection, n: int, seed: int = 0) -> list[str]:
        """Up to n item ids in a seeded pseudo-random order (all of them when there are fewer)."""
        return [r[0] for r in conn.execute(sql.SQL("SELECT object_id FROM {} WHERE NOT deleted "
                                                           "ORDER BY md5(object_id || %s) LIMIT %s")
                                           .format(self.items), (str(seed), n))]

    # -- improvement ----------------------------------------------------------------------------
    def chunk_vectors(self, conn: psycopg.Connection, object_ids: list[str], user_id: str | None = None,
                      model: bool = False) -> ChunkVectors:
        """Chunk vectors of items as a user sees them (the user's adjusted ones where present), or
        with `model` the model's own vectors from before any adjustment; with the items' versions."""
        seen = sql.SQL("COALESCE(p.original, p.vector)" if model else "COALESCE(u.vector, p.vector)")
        rows = conn.execute(sql.SQL("""
            SELECT p.object_id, p.part_no, {seen}, i.version
            FROM {parts} p JOIN {items} i ON i.object_id = p.object_id
            LEFT JOIN {user_parts} u ON u.user_id = %(user)s AND u.object_id = p.object_id AND u.part_no = p.part_no
            WHERE NOT p.is_average AND p.object_id = ANY(%(ids)s) ORDER BY p.object_id, p.part_no
        """).format(parts=self.parts, items=self.items, user_parts=self.user_parts, seen=seen),
            {"user": user_id, "ids": list(object_ids)})
        out = ChunkVectors()
        for object_id, part_no, vec, version in rows:
            out.setdefault(object_id, []).append((part_no, vec.to_numpy()))
            out.versions[object_id] = version
        return out

    def adjusted(self, conn: psycopg.Connection, object_ids: list[str]) -> set[str]:
        """The items among these whose global vectors differ from the model's (click memories)."""
        return {r[0] for r in conn.execute(sql.SQL("SELECT DISTINCT object_id FROM {} WHERE object_id = ANY(%s) "
                                                   "AND original IS NOT NULL").format(self.parts), (list(object_ids),))}

    def save_global(self, conn: psycopg.Connection, updates: list[tuple[str, int, np.ndarray]],
                    read_versions: dict[str, int] | None = None) -> None:
        """New vectors for chunks; the model's vector is kept in `original` the first time. With
        `read_versions` (ChunkVectors.versions) only items still at the version read are written."""
        updates = self._unchanged_since_read(conn, updates, read_versions)
        if updates:
            conn.execute(sql.SQL("""
                UPDATE {parts} p SET original = COALESCE(p.original, p.vector), vector = u.vector
                FROM unnest(%s::text[], %s::int[], %s::vector[]) AS u(object_id, part_no, vector)
                WHERE p.object_id = u.object_id AND p.part_no = u.part_no
            """).format(parts=self.parts), ([u[0] for u in updates], [u[1] for u in updates],
                                            [np.asarray(u[2], dtype=np.float32) for u in updates]))

    def save_user(self, conn: psycopg.Connection, user_id: str, updates: list[tuple[str, int, np.ndarray]],
                  read_versions: dict[str, int] | None = None) -> None:
        """A user's own copies of chunk vectors; `read_versions` as in save_global."""
        updates = self._unchanged_since_read(conn, updates, read_versions)
        if updates:
            conn.execute(sql.SQL("""
                INSERT INTO {user_parts} (user_id, object_id, part_no, vector)
                SELECT %s, u.object_id, u.part_no, u.vector
                FROM unnest(%s::text[], %s::int[], %s::vector[]) AS u(object_id, part_no, vector)
                WHERE EXISTS (SELECT 1 FROM {items} i WHERE i.object_id = u.object_id AND NOT i.deleted)
                ON CONFLICT (user_id, object_id, part_no) DO UPDATE SET vector = EXCLUDED.vector, updated_at = now()
            """).format(user_parts=self.user_parts, items=self.items),
                (user_id, [u[0] for u in updates], [u[1] for u in updates],
                 [np.asarray(u[2], dtype=np.float32) for u in updates]))

    def _unchanged_since_read(self, conn: psycopg.Connection, updates: list[tuple[str, int, np.ndarray]],
                              read_versions: dict[str, int] | None) -> list[tuple[str, int, np.ndarray]]:
        """The updates whose item is still at the version they were computed from, share-locked until
        the transaction ends so no upsert or delete changes it before the write commits. SKIP LOCKED: an
        item a writer holds right now is being rewritten, so its update is dropped rather than waited
        for (waiting, item by item in one transaction, could deadlock with that writer)."""
        if read_versions is None or not updates:
            return updates
        rows = conn.execute(sql.SQL("""
            SELECT object_id, version FROM {items} WHERE object_id = ANY(%s) AND NOT deleted
            ORDER BY object_id FOR SHARE SKIP LOCKED
        """).format(items=self.items), (sorted({u[0] for u in updates}),)).fetchall()
        current = {object_id for object_id, version in rows if read_versions.get(object_id) == version}
        return [u for u in updates if u[0] in current]

    def forget_user(self, conn: psycopg.Connection, user_id: str) -> int:
        return conn.execute(sql.SQL("DELETE FROM {} WHERE user_id = %s").format(self.user_parts), (user_id,)).rowcount

    def undo_global(self, conn: psycopg.Connection) -> int:
        """Puts the model's vectors back wherever clicks moved them."""
        return conn.execute(sql.SQL("UPDATE {} SET vector = original, original = NULL WHERE original IS NOT NULL")
                            .format(self.parts)).rowcount
