"""The search query: a collection's items ranked by their best chunk, one page at a time; and the three
search modes (search_mode): that dense ranking, the lexical one (store/lexical.py), or both fused
(store/fusion.py).

The HNSW scan yields chunks as one deterministic stream; an item's rank is where its first chunk appears
in it. The scan is iterative (hnsw.iterative_scan, set on every connection by store/db.py): with a filter
it goes on past hnsw.ef_search candidates until enough rows pass. In relaxed order each further batch
may hold chunks nearer than the last batch's (strict order drops them: at 100k vectors and a filter
admitting 10 %, recall@10 0.911 strict against 0.988 relaxed at the same speed; BENCHMARKS.md, "Search
as the collection grows"), so the stream is sorted by distance within each block of BLOCK rows. A
deeper page reads a longer prefix of whole blocks of the same stream, so the ranking of earlier items
never changes: pages have no duplicates and no gaps. If a prefix holds too few distinct items (many
chunks per item), it is doubled and read again. An item scores by its chunk at its first position. With
a user id, the items that user's clicks adjusted are scored exactly with the user's vectors and slotted
into the stream by score (merged(): the stream keeps its own order, which falls only block by block).

A search's statements are cancelled after postgres.search_timeout_ms (`statement_timeout`): a filter the
planner cannot use an index for, or a database under load, ends as SearchTimeout rather than holding a
connection and a backend for as long as the scan takes. The Serve replica's search connections carry that
timeout from the moment they open (db.open_pool) and pass timeout_ms=None; given a timeout_ms, the search
runs in a transaction of its own that sets it (SET LOCAL) for its statements alone.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import psycopg
from psycopg import sql

from es_ray.store import lexical
from es_ray.store.collections import Collection
from es_ray.store.filters import compile_filter
from es_ray.store.fusion import Fusion, fuse

MAX_POOL = 200_000  # chunks read at most for one page (hnsw.max_scan_tuples bounds the scan too)
BLOCK = 40          # stream rows sorted by distance together (a first page reads one block)


class SearchTimeout(Exception):
    """Postgres cancelled the search at its statement timeout."""


@dataclass
class SearchHit:
    id: str
    score: float
    payload: dict[str, Any]
    dense_rank: int | None = None     # its rank in the dense and in the lexical list (None: not in it, or
    lexical_rank: int | None = None   # that list was not computed), recorded with a session


@dataclass(frozen=True)
class Ranking:
    """How search_mode ranks: the mode and, for hybrid, the fusion, each list's depth and the lexical
    index's text search configuration (search.* in configs/stack.yaml)."""

    mode: str = "dense"                  # dense | lexical | hybrid
    fusion: Fusion = Fusion()
    depth: int = 100
    text_search_config: str = "english"
    common_share: float = 0.05
    max_terms: int = 64


@contextmanager
def _limited(conn: psycopg.Connection, timeout_ms: int | None):
    """Statements Postgres cancels after `timeout_ms` (SearchTimeout), in a transaction that sets it; with
    None, the connection's own statement_timeout applies and no transaction is opened here."""
    try:
        if not timeout_ms:
            yield
            return
        with conn.transaction():
            # SET LOCAL, as a function so the value is a parameter: it ends with this transaction.
            conn.execute("SELECT set_config('statement_timeout', %s, true)", (f"{int(timeout_ms)}ms",))
            yield
    except psycopg.errors.QueryCanceled as err:
        limit = f"{timeout_ms} ms" if timeout_ms else "its statement timeout"
        raise SearchTimeout(f"the search took longer than {limit} (postgres.search_timeout_ms) and was "
                            "cancelled") from err


def search(conn: psycopg.Connection, collection: Collection, vector: np.ndarray, limit: int, offset: int = 0,
           filter_: dict[str, Any] | None = None, user_id: str | None = None,
           timeout_ms: int | None = None) -> list[SearchHit]:
    """Items of `collection` ranked by their first chunk in the stream, page [offset, offset + limit). Every statement of
    the search is cancelled after `timeout_ms` (SearchTimeout; None: the connection's statement_timeout)."""
    with _limited(conn, timeout_ms):
        return _search(conn, collection, vector, limit, offset, filter_, user_id)


LexicalList = list[tuple[str, float, dict[str, Any]]]


def hybrid_lexical(conn: psycopg.Connection, collection: Collection, ranking: Ranking, text: str,
                   filter_: dict[str, Any] | None = None, timeout_ms: int | None = None) -> LexicalList:
    """The lexical list hybrid fuses (its top `depth`): the route reads it on a second connection while
    the query is embedded and the dense list read, and hands it to search_mode."""
    with _limited(conn, timeout_ms):
        return lexical.ranked(conn, collection, text, ranking.depth, 0, filter_, ranking.text_search_config,
                              ranking.common_share, ranking.max_terms)


def search_mode(conn: psycopg.Connection, collection: Collection, ranking: Ranking, text: str,
                vector: np.ndarray | None, limit: int, offset: int = 0, filter_: dict[str, Any] | None = None,
                user_id: str | None = None, timeout_ms: int | None = None,
                words: Callable[[], LexicalList] | None = None) -> list[SearchHit]:
    """Page [offset, offset + limit) of the ranking `ranking.mode` names: dense (the vector; personalised
    with a user id), lexical (the text; the same for everybody) or hybrid (each list's top `depth` items
    fused: a fixed depth keeps each page a slice of one fixed ranking, which ends after the union of the
    two lists; `words`: where its lexical list is read meanwhile, else it is read after the dense one).
    `vector` may be None in lexical mode. Each hit carries its rank in the lists computed."""
    with _limited(conn, timeout_ms):
        if ranking.mode == "dense":
            hits = _search(conn, collection, vector, limit, offset, filter_, user_id)
            for rank, hit in enumerate(hits, start=offset + 1):
                hit.dense_rank = rank
            return hits
        if ranking.mode == "lexical":
            rows = lexical.ranked(conn, collection, text, limit, offset, filter_, ranking.text_search_config,
                                  ranking.common_share, ranking.max_terms)
            return [SearchHit(id, score, payload, lexical_rank=rank)
                    for rank, (id, score, payload) in enumerate(rows, start=offset + 1)]
        dense = _search(conn, collection, vector, ranking.depth, 0, filter_, user_id)
        words = words() if words is not None else lexical.ranked(
            conn, collection, text, ranking.depth, 0, filter_, ranking.text_search_config, ranking.common_share,
            ranking.max_terms)
    payloads = {h.id: h.payload for h in dense} | {id: payload for id, _, payload in words}
    fused = fuse([(h.id, h.score) for h in dense], [(id, score) for id, score, _ in words], ranking.fusion)
    return [SearchHit(f.id, f.score, payloads[f.id], f.dense_rank, f.lexical_rank)
            for f in fused[offset:offset + limit]]


def _search(conn: psycopg.Connection, collection: Collection, vector: np.ndarray, limit: int, offset: int,
            filter_: dict[str, Any] | None, user_id: str | None) -> list[SearchHit]:
    # The API validated the filter against the stack's limits; here only Postgres' own limit applies.
    condition, params = compile_filter(filter_, column="i.payload", limits=None)
    # The stream joins the items only to filter on their payload: every part has its item (a foreign key,
    # deleted with it), so without a filter the join would only cost an index lookup per streamed chunk.
    source = sql.SQL("{parts} p JOIN {items} i ON i.object_id = p.object_id" if filter_ else "{parts} p").format(
        parts=collection.parts, items=collection.items)
    query = sql.SQL("""
        WITH stream AS (
            SELECT p.object_id, p.vector <=> %(q)s AS distance
            FROM {source}
            WHERE NOT p.is_average AND {condition}
            ORDER BY p.vector <=> %(q)s
            LIMIT {pool}
        ), numbered AS (
            SELECT object_id, distance, row_number() OVER () AS arrival FROM stream
        ), sorted AS (
            SELECT object_id, distance,
                   row_number() OVER (ORDER BY (arrival - 1) / {block}, distance, arrival) AS position
            FROM numbered
        ), ranked AS (
            -- an item scores by its chunk at its first position: a later block may hold a nearer chunk of
            -- it (relaxed order), and a score that changed with the depth read would reorder pages
            SELECT object_id, (array_agg(distance ORDER BY position))[1] AS distance,
                   min(position) AS first_position, count(*) AS n
            FROM sorted GROUP BY object_id
        )
        SELECT r.object_id, 1 - r.distance, i.payload, r.n
        FROM ranked r JOIN {items} i ON i.object_id = r.object_id
        ORDER BY r.first_position
    """)
    q = np.asarray(vector, dtype=np.float32)
    personal = _personal_scores(conn, collection, q, user_id, condition, params) if user_id else {}
    wanted = offset + limit
    pool = -(-2 * wanted // BLOCK) * BLOCK  # whole blocks: the same stream rows sorted the same way
    while True:
        # The depth and block are literals, not parameters: with the vector its only parameter, an
        # unfiltered search's prepared statement gets Postgres's generic plan after five runs and is not
        # planned again (a parameter LIMIT kept it on custom plans, planned on every search: 0.45-0.75 ms
        # of a 2-2.5 ms query at 1,000 documents). A filter's values stay parameters, planned each time.
        statement = query.format(source=source, items=collection.items, condition=condition,
                                 pool=sql.Literal(pool), block=sql.Literal(BLOCK))
        rows = conn.execute(statement, {"q": q, **params}).fetchall()
        streamed = sum(r[3] for r in rows)
        hits = [SearchHit(id=r[0], score=float(r[1]), payload=r[2]) for r in rows if r[0] not in personal]
        # The stream alone must fill the page (unless it ran out): merged with the personal hits below,
        # the first `wanted` results then depend only on the stream's first `wanted` hits, the same rows
        # whatever depth a later page reads.
        if len(hits) >= wanted or streamed < pool or pool >= MAX_POOL:
            break
        pool *= 2
    if personal:
        hits = merged(hits, list(personal.values()))
    return hits[offset:wanted]


def merged(stream: list[SearchHit], personal: list[SearchHit]) -> list[SearchHit]:
    """The stream in its own order with the personal hits (best first) slotted in before the first stream
    hit each outscores. Not a sort of both: the stream's scores need not fall (each block of the relaxed
    index scan is sorted, not the whole stream), and a sort would let a hit that a deeper page reads move
    into an earlier page."""
    pending = sorted(personal, key=lambda h: (-h.score, h.id))
    out, j = [], 0
    for hit in stream:
        while j < len(pending) and pending[j].score > hit.score:
            out.append(pending[j])
            j += 1
        out.append(hit)
    return out + pending[j:]


def _personal_scores(conn: psycopg.Connection, collection: Collection, q: np.ndarray, user_id: str,
                     condition: sql.Composable, params: dict[str, Any]) -> dict[str, SearchHit]:
    """The items this user's clicks adjusted, each scored by its best chunk as the user sees it."""
    rows = conn.execute(sql.SQL("""
        SELECT p.object_id, max(1 - (COALESCE(u.vector, p.vector) <=> %(q)s)), min(i.payload::text)
        FROM {parts} p JOIN {items} i ON i.object_id = p.object_id
        LEFT JOIN {user_parts} u ON u.user_id = %(user)s AND u.object_id = p.object_id AND u.part_no = p.part_no
        WHERE NOT p.is_average AND {condition}
          AND p.object_id IN (SELECT object_id FROM {user_parts} WHERE user_id = %(user)s)
        GROUP BY p.object_id
    """).format(parts=collection.parts, items=collection.items, user_parts=collection.user_parts,
                condition=condition),
        {"q": q, "user": user_id, **params}).fetchall()
    return {r[0]: SearchHit(id=r[0], score=float(r[1]), payload=json.loads(r[2])) for r in rows}
