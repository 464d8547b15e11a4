"""The click log as training data: stored sessions (what was shown at which rank, what was clicked),
and the split of their queries into train and held-out sets.

Every session counts, clicked or not: a result shown five times and clicked once says more than the
click alone, and the position-bias models need the impressions without clicks too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from es_ray.store.clickstream import normalise_query


@dataclass
class LoggedSession:
    session_id: str
    query: str
    irrelevant: bool
    created_at: datetime
    shown: list[tuple[int, str]]                    # (rank, object id), rank 1 = top
    clicked: set[str] = field(default_factory=set)

    def skipped_above(self) -> list[str]:
        """Shown above the lowest click and not clicked: seen and passed over (the mined hard negatives)."""
        if not self.clicked:
            return []
        lowest = max(rank for rank, item in self.shown if item in self.clicked)
        return [item for rank, item in self.shown if rank < lowest and item not in self.clicked]


@dataclass
class SessionBatch:
    """The sessions a fine-tune read, and what identifies them in the model's lineage."""

    sessions: list[LoggedSession]

    def lineage(self) -> dict[str, str | int]:
        ids = sorted(s.session_id for s in self.sessions)
        until = max((s.created_at for s in self.sessions), default=None)
        return {"sessions": len(ids), "sessions_until": until.isoformat() if until else "",
                "sessions_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}


def read_sessions(conn: psycopg.Connection, max_sessions: int) -> SessionBatch:
    """The most recent `max_sessions` sessions with their shown results and clicks."""
    rows = conn.execute(
        """SELECT session_id, query, irrelevant, created_at FROM sessions
           ORDER BY created_at DESC, session_id LIMIT %s""", (max_sessions,)).fetchall()
    sessions = {r[0]: LoggedSession(r[0], r[1], r[2], r[3], []) for r in rows}
    ids = list(sessions)
    for session_id, rank, object_id in conn.execute(
            "SELECT session_id, rank, object_id FROM session_results WHERE session_id = ANY(%s) ORDER BY session_id, rank",
            (ids,)):
        sessions[session_id].shown.append((rank, object_id))
    for session_id, object_id in conn.execute(
            "SELECT session_id, object_id FROM events WHERE type = 'click' AND session_id = ANY(%s)", (ids,)):
        sessions[session_id].clicked.add(object_id)
    return SessionBatch(sorted(sessions.values(), key=lambda s: (s.created_at, s.session_id)))


def is_heldout(query: str, seed: int, fraction: float) -> bool:
    """A seeded hash of the normalised query text: the same query (whatever its case or spacing) always
    lands on the same side, so no held-out query is ever trained on."""
    digest = hashlib.sha256(f"{seed}:{normalise_query(query)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_by_query(sessions: list[LoggedSession], seed: int, fraction: float
                   ) -> tuple[list[LoggedSession], list[LoggedSession]]:
    train, heldout = [], []
    for session in sessions:
        (heldout if is_heldout(session.query, seed, fraction) else train).append(session)
    return train, heldout
