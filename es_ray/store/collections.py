"""One collection per model version: items_<name> (id, payload, version) and parts_<name> (vectors).

An item split into chunks has one part per chunk (part_no 1..n) and one average part (part_no 0,
is_average). Search ranks items by their best chunk through an HNSW index over the chunk vectors.
All SQL for collection tables lives here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import psycopg
from psycopg import sql

from es_ray.store.filters import compile_filter

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
MAX_POOL = 200_000  # chunks read at most for one page (hnsw.max_scan_tuples bounds the scan too)


@dataclass
class EmbeddedItem:
    """An item ready to store: its chunk vectors (one row each) and its payload."""

    id: str
    payload: dict[str, Any]
    chunks: np.ndarray                       # (n_chunks, dim), L2-normalised
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> np.ndarray:
        mean = self.chunks.mean(axis=0)
        return mean / max(float(np.linalg.norm(mean)), 1e-12)


@dataclass
class SearchHit:
    id: str
    score: float
    payload: dict[str, Any]


def collection_name(model_version: int) -> str:
    return f"v{int(model_version)}"


class Collection:
    """SQL for one collection's two tables. Methods take a connection so callers own transactions."""

    def __init__(self, name: str, dim: int):
        if not NAME_PATTERN.match(name):
            raise ValueError(f"invalid collection name {name!r}")
        self.name, self.dim = name, dim
        self.items = sql.Identifier(f"items_{name}")
        self.parts = sql.Identifier(f"parts_{name}")

    # -- schema -------------------------------------------------------------------------------
    def create(self, conn: psycopg.Connection, m: int = 16, ef_construction: int = 64) -> None:
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
            CREATE INDEX IF NOT EXISTS {payload_idx} ON {items} USING gin (payload jsonb_path_ops);
            CREATE INDEX IF NOT EXISTS {hnsw_idx} ON {parts} USING hnsw (vector vector_cosine_ops)
                WITH (m = {m}, ef_construction = {efc}) WHERE NOT is_average;
        """).format(items=self.items, parts=self.parts, dim=sql.Literal(self.dim),
                    payload_idx=sql.Identifier(f"items_{self.name}_payload"),
                    hnsw_idx=sql.Identifier(f"parts_{self.name}_hnsw"),
                    m=sql.Literal(m), efc=sql.Literal(ef_construction)))

    def drop(self, conn: psycopg.Connection) -> None:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {parts}; DROP TABLE IF EXISTS {items}")
                     .format(parts=self.parts, items=self.items))

    # -- writes -------------------------------------------------------------------------------
    def upsert(self, conn: psycopg.Connection, items: Iterable[EmbeddedItem]) -> int:
        """Replaces each item and all its parts in one transaction (last write of an id wins).

        Rows are staged with COPY (binary for vectors) and merged with one INSERT ... ON CONFLICT,
        in id order so concurrent writers lock rows in the same order and cannot deadlock.
        """
        by_id = {item.id: item for item in items}
        if not by_id:
            return 0
        ordered = [by_id[k] for k in sorted(by_id)]
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("""
                CREATE TEMP TABLE IF NOT EXISTS stage_items (object_id text, payload jsonb, source jsonb)
                    ON COMMIT DELETE ROWS;
                CREATE TEMP TABLE IF NOT EXISTS {stage_parts} (object_id text, part_no integer,
                    is_average boolean, vector vector({dim})) ON COMMIT DELETE ROWS;
            """).format(stage_parts=sql.Identifier(f"stage_parts_{self.dim}"), dim=sql.Literal(self.dim)))
            with cur.copy("COPY stage_items (object_id, payload, source) FROM STDIN") as copy:
                for item in ordered:
                    copy.write_row((item.id, json.dumps(item.payload), json.dumps(item.source)))
            with cur.copy(sql.SQL("COPY {} (object_id, part_no, is_average, vector) FROM STDIN WITH (FORMAT BINARY)")
                          .format(sql.Identifier(f"stage_parts_{self.dim}"))) as copy:
                copy.set_types(["text", "int4", "bool", "vector"])
                for item in ordered:
                    copy.write_row((item.id, 0, True, item.average.astype(np.float32)))
                    for part_no, vector in enumerate(item.chunks, start=1):
                        copy.write_row((item.id, part_no, False, np.asarray(vector, dtype=np.float32)))
            cur.execute(sql.SQL("""
                INSERT INTO {items} (object_id, payload, source, version)
                    SELECT object_id, payload, source, nextval('item_write_seq') FROM stage_items ORDER BY object_id
                ON CONFLICT (object_id) DO UPDATE
                    SET payload = EXCLUDED.payload, source = EXCLUDED.source,
                        version = EXCLUDED.version, updated_at = now();
                DELETE FROM {parts} WHERE object_id IN (SELECT object_id FROM stage_items);
                INSERT INTO {parts} (object_id, part_no, is_average, vector)
                    SELECT object_id, part_no, is_average, vector FROM {stage_parts};
            """).format(items=self.items, parts=self.parts,
                        stage_parts=sql.Identifier(f"stage_parts_{self.dim}")))
        return len(ordered)

    def delete(self, conn: psycopg.Connection, ids: list[str]) -> int:
        with conn.transaction():
            cur = conn.execute(sql.SQL("DELETE FROM {} WHERE object_id = ANY(%s)").format(self.items), (list(ids),))
            return cur.rowcount

    # -- reads --------------------------------------------------------------------------------
    def count(self, conn: psycopg.Connection) -> int:
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self.items)).fetchone()[0]

    def get(self, conn: psycopg.Connection, ids: list[str]) -> dict[str, dict[str, Any]]:
        rows = conn.execute(sql.SQL("SELECT object_id, payload, version FROM {} WHERE object_id = ANY(%s)")
                            .format(self.items), (list(ids),)).fetchall()
        return {r[0]: {"payload": r[1], "version": r[2]} for r in rows}

    def search(self, conn: psycopg.Connection, vector: np.ndarray, limit: int, offset: int = 0,
               filter_: dict[str, Any] | None = None) -> list[SearchHit]:
        """Items ranked by their best chunk, page [offset, offset + limit).

        The HNSW scan yields chunks as one deterministic stream; an item's rank is where its first
        chunk appears in it. A deeper page reads a longer prefix of the same stream, so the ranking
        of earlier items never changes: pages have no duplicates and no gaps. If a prefix holds too
        few distinct items (many chunks per item), it is doubled and read again.
        """
        condition, params = compile_filter(filter_, column="i.payload")
        query = sql.SQL("""
            WITH stream AS (
                SELECT p.object_id, p.vector <=> %(q)s AS distance
                FROM {parts} p JOIN {items} i ON i.object_id = p.object_id
                WHERE NOT p.is_average AND {condition}
                ORDER BY p.vector <=> %(q)s
                LIMIT %(pool)s
            ), numbered AS (
                SELECT object_id, distance, row_number() OVER () AS position FROM stream
            ), ranked AS (
                SELECT object_id, min(distance) AS distance, min(position) AS first_position, count(*) AS n
                FROM numbered GROUP BY object_id
            )
            SELECT r.object_id, 1 - r.distance, i.payload, r.n
            FROM ranked r JOIN {items} i ON i.object_id = r.object_id
            ORDER BY r.first_position
        """).format(parts=self.parts, items=self.items, condition=condition)
        wanted = offset + limit
        pool = max(2 * wanted, 40)
        while True:
            rows = conn.execute(query, {"q": np.asarray(vector, dtype=np.float32), "pool": pool, **params}).fetchall()
            streamed = sum(r[3] for r in rows)
            if len(rows) >= wanted or streamed < pool or pool >= MAX_POOL:
                return [SearchHit(id=r[0], score=float(r[1]), payload=r[2]) for r in rows[offset:wanted]]
            pool *= 2
