"""The click log as training data: stored sessions (what was shown at which rank, what was clicked),
and the split of their queries into train and held-out sets.

Every session that may teach counts, clicked or not: a result shown five times and clicked once says
more than the click alone, and the position-bias models need the impressions without clicks too. Which
sessions and clicks may teach is the learning guards' decision (learning_guards.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime

import psycopg

from es_ray.config import LearningSettings
from es_ray.logs import get_logger
from es_ray.store.clickstream import LoggedSession, normalise_query, recent_sessions
from es_ray.train.learning_guards import teaching_sessions

log = get_logger(__name__)


@dataclass
class SessionBatch:
    """The sessions a fine-tune read, and what identifies them in the model's lineage."""

    sessions: list[LoggedSession]
    dropped: dict[str, int] = field(default_factory=dict)    # what the learning guards left out

    @classmethod
    def guarded(cls, sessions: list[LoggedSession], learning: LearningSettings) -> "SessionBatch":
        """The sessions a fine-tune may learn from (learning_guards.teaching_sessions)."""
        guarded = teaching_sessions(sessions, learning)
        return cls(guarded.sessions, guarded.dropped)

    def lineage(self) -> dict[str, str | int]:
        ids = sorted(s.session_id for s in self.sessions)
        until = max((s.created_at for s in self.sessions), default=None)
        return {"sessions": len(ids), "sessions_until": until.isoformat() if until else "",
                "sessions_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]}


def read_sessions(conn: psycopg.Connection, max_sessions: int, learning: LearningSettings,
                  since: datetime | None = None) -> SessionBatch:
    """The most recent `max_sessions` sessions with their shown results and clicks, none recorded by
    learning.exclude_sources, through the learning guards: what the fine-tune trains on and the gate
    scores on. `since`: only sessions recorded from then on, taken before the guards, so that older
    sessions count toward no guard (a benchmark learning from its own sessions alone)."""
    logged = recent_sessions(conn, max_sessions, learning.exclude_sources)
    if since is not None:
        logged = [s for s in logged if s.created_at is not None and s.created_at >= since]
    batch = SessionBatch.guarded(logged, learning)
    log.info("clicklog.read", sessions=len(batch.sessions), **{f"dropped_{k}": v for k, v in batch.dropped.items()})
    return batch


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
