"""Forgetting a user: what their clicks taught, in every live collection, and their sessions.

Their own vectors live in each collection's user_parts: blue's, green's (being built or waiting for a
switch) and previous's (a rollback would bring that copy back). Their sessions and their counted
evidence (store/user_evidence.py) are deleted, so neither a reindex's replay nor a fine-tune learns from
them again. One transaction, holding the improvement lock
of every live collection (blue, green, previous: the order a pass takes them in): a pass or a replay that
read the user's sessions before cannot write their vectors after.
"""

from __future__ import annotations

from typing import Any

import psycopg

from es_ray.improve.loop import improvement_lock
from es_ray.logs import get_logger
from es_ray.store import blue_green, clickstream, locks, user_evidence
from es_ray.store.collections import Collection

log = get_logger(__name__)


def forget_user(conn: psycopg.Connection, user_id: str) -> dict[str, Any]:
    """Deletes the user's adjusted vectors everywhere and their sessions; returns the counts."""
    with conn.transaction():
        state = blue_green.get_state(conn, lock=True)  # no switch or drop changes the collections meanwhile
        live = [Collection(t.collection, t.dim) for t in (state.blue, state.green, state.previous) if t is not None]
        for collection in live:
            locks.transaction_lock(conn, improvement_lock(collection))
        vectors = {collection.name: collection.forget_user(conn, user_id) for collection in live}
        sessions = clickstream.forget_user_sessions(conn, user_id)
        queries = user_evidence.forget(conn, user_id)   # what a reindex would re-derive them from
    log.info("improve.user_forgotten", vectors=vectors, sessions=sessions, evidence_queries=queries)
    return {"user_id": user_id, "deleted_vectors": sum(vectors.values()), "vectors_by_collection": vectors,
            "deleted_sessions": sessions}
