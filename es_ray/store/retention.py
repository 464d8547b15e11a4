"""Retention: prunes old sessions (with their shown results and events) by age and by count.

Only sessions whose lessons live on elsewhere are pruned: the improvement loop has consumed them (an
anonymous session's impressions and clicks are in the click evidence, a user's labels in the user
evidence, and a reindex re-derives from those counts), or their source is excluded from learning and
they are past the age. Sessions still waiting for the improvement loop are never pruned, so retention
cannot take away what has not been learned yet.

Each DELETE takes at most `delete_batch` sessions in its own short transaction (session_results and
events go with them, ON DELETE CASCADE), and one call makes at most `max_batches` of them: a backlog of
millions is pruned over several calls, never in one long transaction that holds locks and bloats the WAL.
Rows a running improvement pass has locked are skipped, not waited for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from es_ray.config import RetentionSettings


@dataclass
class Pruned:
    by_age: int = 0
    by_count: int = 0
    finished: bool = True    # False: the call's DELETE budget ran out with more left to prune

    def as_dict(self) -> dict[str, int | bool]:
        return {"by_age": self.by_age, "by_count": self.by_count, "finished": self.finished}


# Consumed, or excluded from learning (and so never consumed while excluded).
_PRUNABLE_BY_AGE = """(improved_at IS NOT NULL OR source = ANY(%(exclude)s::text[]))
                      AND created_at < now() - make_interval(secs => %(age_s)s)"""


def prune(conn: psycopg.Connection, policy: RetentionSettings, exclude_sources: Sequence[str] = ()) -> Pruned:
    """One bounded round of pruning: by age first, then the oldest consumed sessions beyond
    `max_sessions`. `conn` is in autocommit mode; each batch is its own transaction."""
    pruned = Pruned()
    budget = policy.max_batches
    if policy.max_age_days is not None:
        params = {"exclude": list(exclude_sources), "age_s": policy.max_age_days * 86_400.0}
        while budget > 0:
            budget -= 1
            deleted = _delete_batch(conn, _PRUNABLE_BY_AGE, params, policy.delete_batch)
            pruned.by_age += deleted
            if deleted < policy.delete_batch:
                break
        else:
            pruned.finished = not _any_left(conn, _PRUNABLE_BY_AGE, params)
    if policy.max_sessions is not None and pruned.finished:
        excess = conn.execute("SELECT count(*) FROM sessions").fetchone()[0] - policy.max_sessions
        while excess > 0:
            if budget == 0:
                pruned.finished = not _any_left(conn, "improved_at IS NOT NULL", {})
                break
            budget -= 1
            wanted = min(excess, policy.delete_batch)
            deleted = _delete_batch(conn, "improved_at IS NOT NULL", {}, wanted)
            pruned.by_count += deleted
            excess -= deleted   # counted once per call: new sessions meanwhile wait for the next call
            if deleted < wanted:
                break   # the rest is waiting for the improvement loop (or locked by a pass)
    return pruned


def _delete_batch(conn: psycopg.Connection, where: str, params: dict, limit: int) -> int:
    """Deletes up to `limit` of the oldest sessions matching `where`; returns how many."""
    with conn.transaction():
        return conn.execute(
            f"""DELETE FROM sessions WHERE session_id IN (
                    SELECT session_id FROM sessions WHERE {where}
                    ORDER BY created_at, session_id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)""",
            {**params, "limit": limit}).rowcount


def _any_left(conn: psycopg.Connection, where: str, params: dict) -> bool:
    return conn.execute(f"SELECT EXISTS (SELECT 1 FROM sessions WHERE {where})", params).fetchone()[0]
