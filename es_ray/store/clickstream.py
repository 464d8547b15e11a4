"""SQL for the clickstream: sessions (what was shown, ranked, and who recorded it), events (what the user
did), and the irrelevant mark. Writes are idempotent and all-or-nothing: a request that is refused stores
nothing. The learners' readers leave out the sources configured in learning.exclude_sources."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from es_ray.config import SessionSource


class UnknownSession(LookupError):
    """No session has this id."""


class Conflict(ValueError):
    """The id is taken by a record with different content."""


class EventRejected(ValueError):
    """An event does not fit its session (for example an item that was not shown)."""


@dataclass(frozen=True)
class Provenance:
    """Who recorded a session: its source, the API key's name where one was used, and the client
    identity (es_ray/serve/clients.py) that sent it."""

    source: SessionSource
    key_name: str | None = None
    client: str | None = None


@dataclass
class Session:
    session_id: str
    user_id: str | None
    query: str
    model_version: int | None
    irrelevant: bool
    created_at: datetime
    results: list[tuple[int, str]] = field(default_factory=list)   # (rank, object id)
    events: list[dict[str, Any]] = field(default_factory=list)
    swapped_rank: int | None = None    # search showed ranks swapped_rank and swapped_rank + 1 exchanged
    source: SessionSource | None = None
    key_name: str | None = None
    client: str | None = None
    mode: str | None = None            # the search mode that ranked it (None: recorded elsewhere)
    list_ranks: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # id -> (dense, lexical)


@dataclass
class LoggedSession:
    """A recorded search as the learners read it (the improvement loop, the fine-tune, the simulator):
    what was shown at which rank, and what was clicked."""

    session_id: str
    query: str
    irrelevant: bool
    created_at: datetime | None
    shown: list[tuple[int, str]]                    # (rank, object id), rank 1 = top
    clicked: set[str] = field(default_factory=set)
    user_id: str | None = None                      # None: anonymous
    source: SessionSource | None = None             # None: not read from the store
    client: str | None = None
    filtered: bool = False                          # its search had a payload filter
    mode: str | None = None                         # dense | lexical | hybrid; None: not recorded
    list_ranks: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # id -> (dense, lexical)
    model_version: int | None = None                # the model whose collection ranked it

    @property
    def learning_client(self) -> str:
        """Whom this session counts for when the learners count clients: its recorded client, or where
        none was recorded (sessions older than migration 2) the session itself."""
        return self.client or self.session_id

    def skipped_above(self) -> list[str]:
        """Shown above the lowest click and not clicked: seen and passed over."""
        if not self.clicked:
            return []
        lowest = max(rank for rank, item in self.shown if item in self.clicked)
        return [item for rank, item in self.shown if rank < lowest and item not in self.clicked]


def normalise_query(query: str) -> str:
    """The key that makes two spellings of one query the same query (case, spacing)."""
    return " ".join(query.lower().split())


def record_session(conn: psycopg.Connection, session_id: str, user_id: str | None, query: str,
                   model_version: int | None, results: list[tuple[int, str]], provenance: Provenance,
                   swapped_rank: int | None = None, filtered: bool = False, mode: str | None = None,
                   list_ranks: dict[str, tuple[int | None, int | None]] | None = None) -> bool:
    """Stores a session; True if new. The same id with the same content again is a no-op (whoever sends it:
    the first recording's provenance stays). `filtered`: its search had a payload filter. `mode` and
    `list_ranks` (item id -> its rank in the dense and in the lexical list, None where absent): how search
    ranked it, what a learner of the fusion needs."""
    list_ranks = list_ranks or {}
    ranks = [list_ranks.get(object_id, (None, None)) for _, object_id in results]
    # One statement (a round trip): the session and its shown list, the list only where the session is new.
    # Data-modifying CTEs all run whether or not the outer SELECT reads them (PostgreSQL docs, "Data-Modifying
    # Statements in WITH"); the shown list's foreign key is checked at the statement's end. Atomic on its own
    # on an autocommit connection (the search route's); elsewhere in a transaction, committed here.
    with nullcontext() if conn.autocommit else conn.transaction():
        inserted = conn.execute(
            """WITH new AS (
                   INSERT INTO sessions (session_id, user_id, query, model_version, swapped_rank, source, key_name,
                                         client, filtered, mode)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (session_id) DO NOTHING RETURNING session_id
               ), shown AS (
                   INSERT INTO session_results (session_id, rank, object_id, dense_rank, lexical_rank)
                   SELECT new.session_id, r.rank, r.object_id, r.dense_rank, r.lexical_rank
                   FROM new, unnest(%s::integer[], %s::text[], %s::integer[], %s::integer[])
                        AS r (rank, object_id, dense_rank, lexical_rank)
               )
               SELECT count(*) FROM new""",
            (session_id, user_id, query, model_version, swapped_rank, provenance.source, provenance.key_name,
             provenance.client, filtered, mode, [rank for rank, _ in results], [id for _, id in results],
             [dense for dense, _ in ranks], [lexical for _, lexical in ranks]))
        if inserted.fetchone()[0]:
            return True
        existing = get_session(conn, session_id, with_events=False)
    if (existing.user_id, existing.query, sorted(existing.results)) != (user_id, query, sorted(results)):
        raise Conflict(f"session {session_id} already exists with other content")
    return False


def get_session(conn: psycopg.Connection, session_id: str, with_events: bool = True) -> Session:
    row = conn.execute("SELECT session_id, user_id, query, model_version, irrelevant, created_at, swapped_rank, "
                       "source, key_name, client, mode FROM sessions WHERE session_id = %s", (session_id,)).fetchone()
    if row is None:
        raise UnknownSession(f"no session {session_id!r}")
    session = Session(*row[:6], swapped_rank=row[6], source=row[7], key_name=row[8], client=row[9], mode=row[10])
    rows = conn.execute("SELECT rank, object_id, dense_rank, lexical_rank FROM session_results WHERE session_id = %s "
                        "ORDER BY rank", (session_id,)).fetchall()
    session.results = [(r[0], r[1]) for r in rows]
    session.list_ranks = {r[1]: (r[2], r[3]) for r in rows}
    if with_events:
        session.events = [{"event_id": e[0], "item_id": e[1], "type": e[2], "created_at": e[3]} for e in conn.execute(
            "SELECT event_id, object_id, type, created_at FROM events WHERE session_id = %s ORDER BY created_at, "
            "event_id", (session_id,))]
    return session


def session_owner(conn: psycopg.Connection, session_id: str) -> str | None:
    """The user a session was recorded for (None: anonymous); UnknownSession if there is none."""
    row = conn.execute("SELECT user_id FROM sessions WHERE session_id = %s", (session_id,)).fetchone()
    if row is None:
        raise UnknownSession(f"no session {session_id!r}")
    return row[0]


def add_events(conn: psycopg.Connection, session_id: str, events: list[tuple[str, str, str]]) -> tuple[int, int]:
    """Adds (event id, item id, type) events; returns (accepted, duplicates). All or nothing. Event ids
    are the client's, unique within the session: another session's same id is another event."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM sessions WHERE session_id = %s", (session_id,)).fetchone() is None:
            raise UnknownSession(f"no session {session_id!r}")
        shown = {r[0] for r in conn.execute(
            "SELECT object_id FROM session_results WHERE session_id = %s", (session_id,))}
        not_shown = sorted({item for _, item, _ in events} - shown)
        if not_shown:
            raise EventRejected(f"item(s) not shown in session {session_id}: {', '.join(not_shown[:10])}")
        ids = [e[0] for e in events]
        if len(set(ids)) != len(ids):
            raise EventRejected("the same event_id appears twice in one request")
        accepted = conn.execute(
            """INSERT INTO events (event_id, session_id, object_id, type)
               SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[])
               ON CONFLICT (session_id, event_id) DO NOTHING RETURNING event_id""",
            (ids, [session_id] * len(ids), [e[1] for e in events], [e[2] for e in events])).fetchall()
        accepted_ids = {r[0] for r in accepted}
        resent = [e for e in events if e[0] not in accepted_ids]
        if resent:
            stored = {r[0]: (r[1], r[2]) for r in conn.execute(
                "SELECT event_id, object_id, type FROM events WHERE session_id = %s AND event_id = ANY(%s)",
                (session_id, [e[0] for e in resent]))}
            for event_id, item, kind in resent:
                if stored.get(event_id) != (item, kind):
                    raise Conflict(f"event_id {event_id!r} was already recorded with other content")
    return len(accepted_ids), len(resent)


def mark_irrelevant(conn: psycopg.Connection, session_id: str) -> None:
    with conn.transaction():
        if conn.execute("UPDATE sessions SET irrelevant = true WHERE session_id = %s",
                        (session_id,)).rowcount == 0:
            raise UnknownSession(f"no session {session_id!r}")


def forget_user_sessions(conn: psycopg.Connection, user_id: str) -> int:
    """Deletes a user's sessions with their results and events (a forgotten user's sessions teach no
    replay and no fine-tune again); returns how many."""
    return conn.execute("DELETE FROM sessions WHERE user_id = %s", (user_id,)).rowcount


# --- the click log, read by the learners ------------------------------------------------------------

# Every reader below takes `exclude_sources` (learning.exclude_sources): sessions of those sources are
# left out, as if they had never been recorded.
LOG_COLUMNS = "session_id, query, irrelevant, created_at, user_id, source, client, filtered, mode, model_version"
KEPT = "source <> ALL(%(exclude)s::text[])"


def recent_sessions(conn: psycopg.Connection, max_sessions: int, exclude_sources: Sequence[str] = ()
                    ) -> list[LoggedSession]:
    """The most recent `max_sessions` sessions, oldest first."""
    rows = conn.execute(f"""SELECT {LOG_COLUMNS} FROM sessions WHERE {KEPT}
                            ORDER BY created_at DESC, session_id LIMIT %(limit)s""",
                        {"exclude": list(exclude_sources), "limit": max_sessions}).fetchall()
    return sorted(_with_results(conn, rows), key=lambda s: (s.created_at, s.session_id))


def claim_unimproved(conn: psycopg.Connection, limit: int, settle_s: float, exclude_sources: Sequence[str] = (),
                     max_results: int | None = None) -> list[LoggedSession]:
    """Up to `limit` sessions older than `settle_s` the improvement loop has not learned from, locked
    for this transaction (SKIP LOCKED: a concurrent pass takes others). Excluded sessions are not
    claimed, so they stay unlearned (not consumed) while their source is excluded. With `max_results`,
    the claim stops before the session whose shown results would exceed it (the first is always taken,
    so a session larger than the budget is not stuck): the pass's memory is bounded by results, not
    only by sessions."""
    rows = conn.execute(
        f"""SELECT {LOG_COLUMNS} FROM sessions
            WHERE improved_at IS NULL AND created_at < now() - make_interval(secs => %(settle)s) AND {KEPT}
            ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED""",
        {"settle": settle_s, "limit": limit, "exclude": list(exclude_sources)}).fetchall()
    if max_results is not None:
        rows = rows[:within_results(conn, [r[0] for r in rows], max_results)]
    return _with_results(conn, rows)


def within_results(conn: psycopg.Connection, session_ids: list[str], max_results: int) -> int:
    """How many of `session_ids`, taken in order, show at most `max_results` results in all (at least one).
    The sessions left out stay locked until the pass ends and unimproved: the next pass takes them."""
    if not session_ids:
        return 0
    counts = dict(conn.execute("SELECT session_id, count(*) FROM session_results WHERE session_id = ANY(%s) "
                               "GROUP BY session_id", (session_ids,)).fetchall())
    total = 0
    for taken, session_id in enumerate(session_ids):
        total += counts.get(session_id, 0)
        if total > max_results and taken > 0:
            return taken
    return len(session_ids)


def mark_improved(conn: psycopg.Connection, session_ids: list[str]) -> None:
    conn.execute("UPDATE sessions SET improved_at = now() WHERE session_id = ANY(%s)", (session_ids,))


def improved_user_sessions(conn: psycopg.Connection, after: tuple | None, limit: int,
                           exclude_sources: Sequence[str] = ()) -> tuple[list[LoggedSession], tuple | None]:
    """Users' sessions already learned from, in (created_at, id) order from `after`. Returns them and
    the next `after`."""
    rows = conn.execute(
        f"""SELECT {LOG_COLUMNS} FROM sessions
            WHERE improved_at IS NOT NULL AND user_id IS NOT NULL AND {KEPT}
              AND (%(at)s::timestamptz IS NULL OR (created_at, session_id) > (%(at)s, %(id)s))
            ORDER BY created_at, session_id LIMIT %(limit)s""",
        {"at": after[0] if after else None, "id": after[1] if after else None, "limit": limit,
         "exclude": list(exclude_sources)}).fetchall()
    return _with_results(conn, rows), ((rows[-1][3], rows[-1][0]) if rows else after)


def count_improved(conn: psycopg.Connection) -> int:
    """Sessions the improvement loop has already learned from."""
    return conn.execute("SELECT count(*) FROM sessions WHERE improved_at IS NOT NULL").fetchone()[0]


def _with_results(conn: psycopg.Connection, rows: list[tuple]) -> list[LoggedSession]:
    """Sessions (rows of LOG_COLUMNS) with their shown results, by rank, and their clicks."""
    if not rows:
        return []
    sessions = {r[0]: LoggedSession(r[0], r[1], r[2], r[3], [], set(), r[4], r[5], r[6], r[7], r[8],
                                    model_version=r[9]) for r in rows}
    for session_id, rank, object_id, dense_rank, lexical_rank in conn.execute(
            "SELECT session_id, rank, object_id, dense_rank, lexical_rank FROM session_results "
            "WHERE session_id = ANY(%s) ORDER BY session_id, rank", (list(sessions),)):
        sessions[session_id].shown.append((rank, object_id))
        if dense_rank is not None or lexical_rank is not None:  # hybrid's lists (the fusion learner reads them)
            sessions[session_id].list_ranks[object_id] = (dense_rank, lexical_rank)
    for session_id, object_id in conn.execute(
            "SELECT session_id, object_id FROM events WHERE type = 'click' AND session_id = ANY(%s)",
            (list(sessions),)):
        sessions[session_id].clicked.add(object_id)
    return [sessions[r[0]] for r in rows]
