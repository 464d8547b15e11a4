"""Click evidence: what anonymous sessions showed and clicked, counted per (query, item, rank).

The improvement loop adds each session it consumes here once, in the same transaction that marks
it improved, so the counts are exact across crashes. Click memories (`es_ray/improve/memory.py`)
are recomputed from these counts, which is what lets a reindex derive them again for a new model
and lets an undo forget them. Model independent: one table for every collection. Personalised
sessions are not counted (what one user clicks stays that user's).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Protocol

import psycopg

from es_ray.store.clickstream import normalise_query


class ShownSession(Protocol):
    query: str
    shown: list[tuple[int, str]]
    clicked: set[str]


def record(conn: psycopg.Connection, sessions: Iterable[ShownSession], live: set[str] | None = None) -> set[str]:
    """Adds the sessions' impressions and clicks, of the items in `live` only where given (a deleted or
    never stored item gathers no evidence); returns the items clicked in them."""
    counts: Counter = Counter()
    texts: dict[str, str] = {}
    clicked: set[str] = set()
    for session in sessions:
        key = normalise_query(session.query)
        texts.setdefault(key, session.query)
        for rank, item in session.shown:
            if live is not None and item not in live:
                continue
            counts[(key, item, rank, "n")] += 1
            if item in session.clicked:
                counts[(key, item, rank, "c")] += 1
                clicked.add(item)
    cells = sorted({k[:3] for k in counts})
    if not cells:
        return clicked
    conn.execute("""
        INSERT INTO click_queries (query_key, query) SELECT * FROM unnest(%s::text[], %s::text[])
        ON CONFLICT (query_key) DO NOTHING""", (sorted(texts), [texts[k] for k in sorted(texts)]))
    conn.execute("""
        INSERT INTO click_evidence (query_key, object_id, rank, impressions, clicks)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::int[], %s::int[])
        ON CONFLICT (query_key, object_id, rank) DO UPDATE
            SET impressions = click_evidence.impressions + EXCLUDED.impressions,
                clicks = click_evidence.clicks + EXCLUDED.clicks""",
                 ([c[0] for c in cells], [c[1] for c in cells], [c[2] for c in cells],
                  [counts[(*c, "n")] for c in cells], [counts[(*c, "c")] for c in cells]))
    return clicked


def queries_that_clicked(conn: psycopg.Connection, items: list[str]) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT query_key FROM click_evidence WHERE object_id = ANY(%s) AND clicks > 0 ORDER BY 1",
        (list(items),))]


def counts_for_queries(conn: psycopg.Connection, query_keys: list[str]) -> list[tuple[str, str, int, int, int]]:
    """(query key, object id, rank, impressions, clicks) of every result these queries showed."""
    return [tuple(r) for r in conn.execute(
        "SELECT query_key, object_id, rank, impressions, clicks FROM click_evidence WHERE query_key = ANY(%s) "
        "ORDER BY query_key, object_id, rank", (list(query_keys),))]


def query_texts(conn: psycopg.Connection, query_keys: list[str]) -> dict[str, str]:
    return dict(conn.execute("SELECT query_key, query FROM click_queries WHERE query_key = ANY(%s)",
                             (list(query_keys),)).fetchall())


def clicked_items(conn: psycopg.Connection, after: str | None, limit: int) -> list[str]:
    """Items with at least one click, in id order after `after` (paging for a re-derive)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT object_id FROM click_evidence WHERE clicks > 0 AND (%s::text IS NULL OR object_id > %s) "
        "ORDER BY object_id LIMIT %s", (after, after, limit))]


def clear(conn: psycopg.Connection) -> int:
    """Forgets every count (an undo of the improvement); returns how many cells there were."""
    removed = conn.execute("DELETE FROM click_evidence").rowcount
    conn.execute("DELETE FROM click_queries")
    return removed
