"""User evidence: what each user's improved sessions taught, counted per (user, query, item).

The improvement loop adds a user's session here once, in the transaction that adjusts the user's vectors
and marks the session improved. A reindex re-derives every user's adjustments from these counts alone
(es_ray/improve/loop.py `rederive`), never from the sessions, so pruning sessions (store/retention.py)
loses nothing they taught. Model independent: query texts, not vectors. The labels are the improvement
loop's; this module only counts them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import psycopg

Kind = Literal["clicked", "skipped", "irrelevant"]


@dataclass(frozen=True)
class Lesson:
    """One label of a session: an item clicked, skipped above a click (`above`: the session's top click,
    which it should rank below), or shown in a session marked irrelevant."""

    object_id: str
    kind: Kind
    above: str = ""


@dataclass
class TaughtSession:
    """A user's session as counted here: who, by which source, for which query, and its labels."""

    user_id: str
    source: str
    query: str
    lessons: list[Lesson]


@dataclass
class UserQuery:
    """Everything one user taught with one query (of one source): the counted labels, and how many
    sessions they came from."""

    user_id: str
    source: str
    query: str
    sessions: int
    lessons: Counter = field(default_factory=Counter)   # Lesson -> sessions


def record(conn: psycopg.Connection, sessions: Iterable[TaughtSession]) -> int:
    """Adds the sessions' labels (sessions without any are not counted); returns how many were added."""
    queries: Counter = Counter()
    lessons: Counter = Counter()
    for session in sessions:
        if not session.lessons:
            continue
        group = (session.user_id, session.source, session.query)
        queries[group] += 1
        for lesson in set(session.lessons):
            lessons[(*group, lesson.object_id, lesson.kind, lesson.above)] += 1
    if not queries:
        return 0
    groups, cells = sorted(queries), sorted(lessons)
    conn.execute("""
        INSERT INTO user_queries (user_id, source, query, sessions)
        SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[])
        ON CONFLICT (user_id, source, query_md5) DO UPDATE SET sessions = user_queries.sessions + EXCLUDED.sessions""",
                 ([g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups], [queries[g] for g in groups]))
    conn.execute("""
        INSERT INTO user_evidence (user_id, source, query_md5, object_id, kind, above, sessions)
        SELECT u, s, md5(q), o, k, a, n
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::int[])
             AS cell(u, s, q, o, k, a, n)
        ON CONFLICT (user_id, source, query_md5, object_id, kind, above)
        DO UPDATE SET sessions = user_evidence.sessions + EXCLUDED.sessions""",
                 tuple([c[i] for c in cells] for i in range(6)) + ([lessons[c] for c in cells],))
    return sum(queries.values())


def page(conn: psycopg.Connection, after: tuple | None, limit: int, exclude_sources: Sequence[str] = ()
         ) -> tuple[list[UserQuery], tuple | None]:
    """Up to `limit` (user, source, query) groups with their labels, in key order from `after`, leaving out
    the sources in `exclude_sources`; returns them and the next `after`. A page's memory is bounded by its
    groups, however many sessions they counted."""
    rows = conn.execute(
        """SELECT user_id, source, query_md5, query, sessions FROM user_queries
           WHERE source <> ALL(%(exclude)s::text[])
             AND (%(after)s::text[] IS NULL OR (user_id, source, query_md5) > (%(u)s, %(s)s, %(q)s))
           ORDER BY user_id, source, query_md5 LIMIT %(limit)s""",
        {"exclude": list(exclude_sources), "after": list(after) if after else None, "limit": limit,
         "u": after[0] if after else None, "s": after[1] if after else None, "q": after[2] if after else None}
    ).fetchall()
    if not rows:
        return [], after
    groups = {(r[0], r[1], r[2]): UserQuery(r[0], r[1], r[3], r[4]) for r in rows}
    for user_id, source, query_md5, object_id, kind, above, sessions in conn.execute(
            """SELECT e.user_id, e.source, e.query_md5, e.object_id, e.kind, e.above, e.sessions
               FROM user_evidence e JOIN unnest(%s::text[], %s::text[], %s::text[]) AS g(u, s, q)
                 ON (e.user_id, e.source, e.query_md5) = (g.u, g.s, g.q)
               ORDER BY 1, 2, 3, 4, 5, 6""",
            ([k[0] for k in groups], [k[1] for k in groups], [k[2] for k in groups])):
        groups[(user_id, source, query_md5)].lessons[Lesson(object_id, kind, above)] = sessions
    last = rows[-1]
    return list(groups.values()), (last[0], last[1], last[2])


def forget(conn: psycopg.Connection, user_id: str) -> int:
    """Forgets what a user taught (their labels go with their queries); returns how many queries."""
    return conn.execute("DELETE FROM user_queries WHERE user_id = %s", (user_id,)).rowcount


def remembered_users(conn: psycopg.Connection, user_ids: Sequence[str]) -> set[str]:
    """Those of `user_ids` with counted evidence now (a user forgotten meanwhile has none)."""
    return {r[0] for r in conn.execute("SELECT DISTINCT user_id FROM user_queries WHERE user_id = ANY(%s)",
                                       (list(user_ids),))}
