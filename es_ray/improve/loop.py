"""The improvement loop: consumes settled sessions exactly once and adjusts the vectors they touched.

One pass (`improve_once`) runs in one transaction:
1. take an advisory lock for the collection (a second loop started by mistake skips the pass, so two
   loops never read-modify-write the same vectors),
2. claim up to `batch_sessions` sessions older than `settle_s` with `FOR UPDATE SKIP LOCKED`,
3. turn them into examples (clicked, skipped-above, irrelevant) on each item's best-matching chunk,
4. adjust the global vectors (sessions without a user) and each user's own copies,
5. mark the sessions improved.
A crash anywhere rolls the whole pass back, so a session is applied once or not at all, across restarts.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg

from es_ray.improve.adjuster import CLICKED, IRRELEVANT, SKIPPED, Examples, VectorAdjuster
from es_ray.logs import get_logger
from es_ray.store.collections import Collection

log = get_logger(__name__)


@dataclass
class SessionRecord:
    session_id: str
    user_id: str | None
    query: str
    irrelevant: bool
    shown: list[tuple[int, str]]     # (rank, object id)
    clicked: set[str]


def claim_sessions(conn: psycopg.Connection, limit: int, settle_s: float) -> list[SessionRecord]:
    rows = conn.execute(
        """SELECT session_id, user_id, query, irrelevant FROM sessions
           WHERE improved_at IS NULL AND created_at < now() - make_interval(secs => %s)
           ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED""", (settle_s, limit)).fetchall()
    return _with_results(conn, rows)


def improved_sessions(conn: psycopg.Connection, after: tuple | None, limit: int) -> tuple[list[SessionRecord], tuple]:
    """Sessions already applied to the blue collection, in (created_at, id) order from `after`; for
    re-deriving their adjustments on a new model's collection. Returns them and the next `after`."""
    rows = conn.execute(
        """SELECT session_id, user_id, query, irrelevant, created_at FROM sessions
           WHERE improved_at IS NOT NULL AND (%(at)s::timestamptz IS NULL OR (created_at, session_id) > (%(at)s, %(id)s))
           ORDER BY created_at, session_id LIMIT %(limit)s""",
        {"at": after[0] if after else None, "id": after[1] if after else None, "limit": limit}).fetchall()
    return _with_results(conn, [r[:4] for r in rows]), ((rows[-1][4], rows[-1][0]) if rows else after)


def _with_results(conn: psycopg.Connection, rows: list[tuple]) -> list[SessionRecord]:
    if not rows:
        return []
    ids = [r[0] for r in rows]
    shown, clicked = defaultdict(list), defaultdict(set)
    for session_id, rank, object_id in conn.execute(
            "SELECT session_id, rank, object_id FROM session_results WHERE session_id = ANY(%s)", (ids,)):
        shown[session_id].append((rank, object_id))
    for session_id, object_id in conn.execute(
            "SELECT session_id, object_id FROM events WHERE type = 'click' AND session_id = ANY(%s)", (ids,)):
        clicked[session_id].add(object_id)
    return [SessionRecord(r[0], r[1], r[2], r[3], sorted(shown[r[0]]), clicked[r[0]]) for r in rows]


def labelled(session: SessionRecord) -> list[tuple[str, int]]:
    """(object id, kind): clicks; shown items above the lowest click that were not clicked; or, for a
    session marked irrelevant without clicks, everything shown. Sessions with neither teach nothing."""
    if session.clicked:
        lowest = max(rank for rank, item in session.shown if item in session.clicked)
        out = [(item, CLICKED) for rank, item in session.shown if item in session.clicked]
        return out + [(item, SKIPPED) for rank, item in session.shown if rank < lowest and item not in session.clicked]
    if session.irrelevant:
        return [(item, IRRELEVANT) for _, item in session.shown]
    return []


def build_examples(sessions: list[SessionRecord], query_vectors: dict[str, np.ndarray],
                   chunks: dict[str, list[tuple[int, np.ndarray]]]):
    """Examples on the chunk of each item that best matches the session's query ("per chunk")."""
    keys: list[tuple[str, int]] = []              # (object id, part no) of each adjusted vector
    index: dict[tuple[str, int], int] = {}
    queries, chunk_idx, kinds, best = [], [], [], []
    for session in sessions:
        q = query_vectors[session.session_id]
        first_click = -1
        pending_skips = []
        for item, kind in labelled(session):
            if item not in chunks:
                continue  # deleted since it was shown
            part_no, _ = max(chunks[item], key=lambda pv: float(pv[1] @ q))
            key = (item, part_no)
            if key not in index:
                index[key] = len(keys)
                keys.append(key)
            if kind == SKIPPED:
                pending_skips.append(index[key])
                continue
            if kind == CLICKED and first_click < 0:
                first_click = len(kinds)
            queries.append(q), chunk_idx.append(index[key]), kinds.append(kind), best.append(-1)
        if first_click >= 0:
            for k in pending_skips:
                queries.append(q), chunk_idx.append(k), kinds.append(SKIPPED), best.append(first_click)
    vectors = np.stack([dict(chunks[o])[p] for o, p in keys]) if keys else np.zeros((0, 0), np.float32)
    examples = Examples(np.asarray(queries, dtype=np.float32), np.asarray(chunk_idx), np.asarray(kinds),
                        np.asarray(best))
    return keys, vectors, examples


def improve_once(conn: psycopg.Connection, collection: Collection, embed_queries, adjuster: VectorAdjuster,
                 batch_sessions: int = 256, settle_s: float = 5.0) -> dict[str, Any]:
    """One pass; returns counts. `embed_queries(texts) -> (n, dim)` is the blue query encoder."""
    started = time.monotonic()
    with conn.transaction():
        lock_key = f"es-ray-improve-{collection.name}"
        if not conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (lock_key,)).fetchone()[0]:
            return {"sessions": 0, "busy": True}
        sessions = claim_sessions(conn, batch_sessions, settle_s)
        if not sessions:
            return {"sessions": 0}
        adjusted = apply_sessions(conn, collection, sessions, embed_queries, adjuster)
        conn.execute("UPDATE sessions SET improved_at = now() WHERE session_id = ANY(%s)",
                     ([s.session_id for s in sessions],))
    result = {"sessions": len(sessions), "useful": adjusted["useful"], "vectors_global": adjusted["global"],
              "vectors_personal": adjusted["personal"], "seconds": round(time.monotonic() - started, 3)}
    log.info("improve.pass", collection=collection.name, **result)
    return result


def apply_sessions(conn: psycopg.Connection, collection: Collection, sessions: list[SessionRecord], embed_queries,
                   adjuster: VectorAdjuster) -> dict[str, int]:
    """Adjusts the collection's vectors from the sessions (global ones and each user's); returns counts."""
    useful = [s for s in sessions if labelled(s)]
    adjusted = {"useful": len(useful), "global": 0, "personal": 0}
    if useful:
        vectors = embed_queries([s.query for s in useful])
        query_vectors = {s.session_id: v for s, v in zip(useful, vectors)}
        by_user: dict[str | None, list[SessionRecord]] = defaultdict(list)
        for s in useful:
            by_user[s.user_id].append(s)
        for user_id, group in by_user.items():
            items = sorted({item for s in group for item, _ in labelled(s)})
            seen = collection.chunk_vectors(conn, items, user_id)
            keys, current, examples = build_examples(group, query_vectors, seen)
            if not keys:
                continue
            # Anchor: the model's vectors for global moves, the global vectors for a user's.
            anchors = collection.chunk_vectors(conn, items, None, model=user_id is None)
            anchor = np.stack([dict(anchors[o])[p] for o, p in keys])
            new = adjuster.adjust(current, anchor, examples)
            updates = [(o, p, v) for (o, p), v in zip(keys, new)]
            if user_id is None:
                collection.save_global(conn, updates)
                adjusted["global"] += len(updates)
            else:
                collection.save_user(conn, user_id, updates)
                adjusted["personal"] += len(updates)
    return adjusted


class ImprovementLoop:
    """Runs `improve_once` every `interval_s` in a background thread until stopped."""

    def __init__(self, run_pass, interval_s: float):
        self.run_pass, self.interval_s = run_pass, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="improvement-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                while self.run_pass().get("sessions", 0) > 0:
                    pass  # drain the backlog before sleeping again
            except Exception:  # noqa: BLE001 - the pass rolled back; try again next interval
                log.exception("improve.pass_failed")

    def stop(self) -> None:
        self._stop.set()


def adjuster_from(settings) -> VectorAdjuster:
    return VectorAdjuster(settings.improve.adjuster)
