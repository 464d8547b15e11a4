"""SQL for a reindex's checkpoints: the key ranges of a green collection (done or still to do) and the
items that failed, with the stage where they failed.

A range is marked done in the same transaction that writes its items, so a restarted reindex skips
exactly what is already in green. Both tables are keyed by the green collection's name.
"""

from __future__ import annotations

from typing import Any

import psycopg

from es_ray.store.collections import Collection


def plan(conn: psycopg.Connection, source: Collection, green: str, range_items: int) -> int:
    """Cuts the source's ids into contiguous ranges (once per green collection); returns how many."""
    existing = conn.execute("SELECT count(*) FROM reindex_ranges WHERE collection = %s", (green,)).fetchone()[0]
    if existing:
        return existing
    bounds = source.key_bounds(conn, range_items)
    if bounds and source.read_range(conn, bounds[-1], None) == []:
        bounds = bounds[:-1]  # the last range would be empty
    edges = [None, *bounds, None]
    with conn.transaction():
        with conn.cursor().copy("COPY reindex_ranges (collection, range_no, after_id, last_id) FROM STDIN") as copy:
            for n in range(len(edges) - 1):
                copy.write_row((green, n, edges[n], edges[n + 1]))
    return len(edges) - 1


def pending(conn: psycopg.Connection, green: str) -> list[dict[str, Any]]:
    """The ranges still to do, in key order."""
    rows = conn.execute("""SELECT range_no, after_id, last_id FROM reindex_ranges
                           WHERE collection = %s AND done_at IS NULL ORDER BY range_no""", (green,)).fetchall()
    # "" for an open end: Ray Data would turn None into NaN (ids are never empty).
    return [{"range_no": r[0], "after_id": r[1] or "", "last_id": r[2] or ""} for r in rows]


def totals(conn: psycopg.Connection, green: str) -> tuple[int, int, int]:
    """(ranges, ranges done, items written by done ranges)."""
    return conn.execute("""SELECT count(*), count(done_at), COALESCE(sum(items) FILTER (WHERE done_at IS NOT NULL), 0)
                           FROM reindex_ranges WHERE collection = %s""", (green,)).fetchone()


def mark_done(conn: psycopg.Connection, green: str, range_no: int, items: int) -> None:
    conn.execute("UPDATE reindex_ranges SET done_at = now(), items = %s WHERE collection = %s AND range_no = %s",
                 (items, green, range_no))


def record_failures(conn: psycopg.Connection, green: str, task_id: str, failed: list[tuple[str, str, str]]) -> None:
    """(object id, stage, error) per item; a later failure of the same item replaces the earlier one."""
    if failed:
        conn.execute("""INSERT INTO reindex_failures (collection, object_id, stage, error, task_id)
                        SELECT %s, f.id, f.stage, f.error, %s FROM unnest(%s::text[], %s::text[], %s::text[])
                            AS f(id, stage, error)
                        ON CONFLICT (collection, object_id) DO UPDATE SET stage = EXCLUDED.stage,
                            error = EXCLUDED.error, task_id = EXCLUDED.task_id, failed_at = now()""",
                     (green, task_id, [f[0] for f in failed], [f[1] for f in failed], [f[2] for f in failed]))


def clear_failures(conn: psycopg.Connection, green: str, object_ids: list[str]) -> None:
    """These items are now in green."""
    conn.execute("DELETE FROM reindex_failures WHERE collection = %s AND object_id = ANY(%s)", (green, object_ids))


def failures(conn: psycopg.Connection, green: str, limit: int = 20) -> tuple[int, list[dict[str, str]]]:
    """How many items failed, and the first `limit` of them by id."""
    total = conn.execute("SELECT count(*) FROM reindex_failures WHERE collection = %s", (green,)).fetchone()[0]
    rows = conn.execute("""SELECT object_id, stage, error FROM reindex_failures WHERE collection = %s
                           ORDER BY object_id LIMIT %s""", (green, limit)).fetchall()
    return total, [{"id": r[0], "stage": r[1], "error": r[2]} for r in rows]


def forget(conn: psycopg.Connection, collection: str) -> None:
    """Drops a collection's checkpoints and failures (a new reindex, a dropped green, a settled blue)."""
    conn.execute("DELETE FROM reindex_ranges WHERE collection = %s", (collection,))
    conn.execute("DELETE FROM reindex_failures WHERE collection = %s", (collection,))
