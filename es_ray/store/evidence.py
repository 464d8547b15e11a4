"""Click evidence: what anonymous sessions showed and clicked, counted per (query, item, rank, client).

The improvement loop adds each session it consumes here once, in the same transaction that marks
it improved, so the counts are exact across crashes. Click memories (`es_ray/improve/memory.py`)
are recomputed from these counts, which is what lets a reindex derive them again for a new model
and lets an undo forget them. Model independent: one table for every collection. Personalised
and filtered sessions are not counted (what one user clicks stays that user's; a filter can show any
item for any query). Counts are kept per client as recorded; `counts_for_queries` reads them through
the learning guards (es_ray/train/learning_guards.py says why): one client's votes per cell capped,
pairs that too few distinct clients clicked left out.
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
    learning_client: str

# Rows counted before migration 3, when the client was not kept: each impression and click in them came
# from a session of its own, and so from a client of its own.
UNKNOWN_CLIENTS = ""


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
            counts[(key, item, rank, session.learning_client, "n")] += 1
            if item in session.clicked:
                counts[(key, item, rank, session.learning_client, "c")] += 1
                clicked.add(item)
    cells = sorted({k[:4] for k in counts})
    if not cells:
        return clicked
    conn.execute("""
        INSERT INTO click_queries (query_key, query) SELECT * FROM unnest(%s::text[], %s::text[])
        ON CONFLICT (query_key) DO NOTHING""", (sorted(texts), [texts[k] for k in sorted(texts)]))
    conn.execute("""
        INSERT INTO click_evidence (query_key, object_id, rank, client, impressions, clicks)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], %s::int[], %s::int[])
        ON CONFLICT (query_key, object_id, rank, client) DO UPDATE
            SET impressions = click_evidence.impressions + EXCLUDED.impressions,
                clicks = click_evidence.clicks + EXCLUDED.clicks""",
                 ([c[0] for c in cells], [c[1] for c in cells], [c[2] for c in cells], [c[3] for c in cells],
                  [counts[(*c, "n")] for c in cells], [counts[(*c, "c")] for c in cells]))
    return clicked


def queries_that_clicked(conn: psycopg.Connection, items: list[str]) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT query_key FROM click_evidence WHERE object_id = ANY(%s) AND clicks > 0 ORDER BY 1",
        (list(items),))]


def counts_for_queries(conn: psycopg.Connection, query_keys: list[str], *, max_votes_per_client: int,
                       min_clients: int) -> list[tuple[str, str, int, int, int]]:
    """(query key, object id, rank, impressions, clicks) of every result these queries showed, as the
    learners may read them: each client's impressions and clicks per cell capped at `max_votes_per_client`,
    and a clicked (query, item) pair left out, impressions and all, until `min_clients` distinct clients
    clicked it (learning_guards.evidence_counts is the same over sessions in memory)."""
    return [tuple(r) for r in conn.execute("""
        WITH counted AS (
            SELECT query_key, object_id, rank, client,
                   -- an old row's counts are one client each (UNKNOWN_CLIENTS), so within any cap of >= 1
                   CASE WHEN client = %(unknown)s THEN impressions ELSE least(impressions, %(cap)s) END AS impressions,
                   CASE WHEN client = %(unknown)s THEN clicks ELSE least(clicks, %(cap)s) END AS clicks
            FROM click_evidence WHERE query_key = ANY(%(keys)s)),
        pairs AS (
            SELECT query_key, object_id,
                   count(DISTINCT client) FILTER (WHERE clicks > 0 AND client <> %(unknown)s)
                   + coalesce(sum(clicks) FILTER (WHERE client = %(unknown)s), 0) AS clients
            FROM counted GROUP BY query_key, object_id)
        SELECT c.query_key, c.object_id, c.rank, sum(c.impressions)::int, sum(c.clicks)::int
        FROM counted c JOIN pairs p USING (query_key, object_id)
        WHERE p.clients = 0 OR p.clients >= %(min_clients)s
        GROUP BY c.query_key, c.object_id, c.rank ORDER BY c.query_key, c.object_id, c.rank""",
        {"keys": list(query_keys), "cap": max_votes_per_client, "min_clients": min_clients,
         "unknown": UNKNOWN_CLIENTS})]


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
