"""Which sessions and clicks may teach what everybody sees: nobody steers the global ranking or the
fine-tune alone (issue 16).

A served session is real, but it can still be steered: one client can search and click a thousand
times, and a search with a narrow payload filter shows any chosen item for any query. Three rules,
with their numbers in the `learning:` section of configs/stack.yaml:

1. A filtered session teaches only its own user's vectors (improve/loop.py applies those), never the
   click evidence or the fine-tune.
2. A (query, item) pair teaches only once `min_clients` distinct clients clicked it. Until then it
   counts as if it had never been shown: its impressions are dropped with its clicks, so an honest
   lone click is not turned into evidence against the item either.
3. One client weighs little: in the evidence at most `max_votes_per_client` impressions and clicks per
   (query, item, rank); in a fine-tune at most `max_votes_per_client` sessions per query and
   `max_sessions_per_client` sessions in all (its most recent).

A client is the session's `learning_client` (its recorded client, else the session itself). The
improvement loop stores evidence per client and store/evidence.py applies rules 2 and 3 in SQL when
it reads it; `evidence_counts` is the same reading over sessions in memory (the quality harness),
and `teaching_sessions` is the fine-tune's (train/clicklog.py). Works on plain session lists.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from es_ray.config import LearningSettings
from es_ray.store.clickstream import LoggedSession, normalise_query


def unfiltered(sessions: Iterable[LoggedSession]) -> list[LoggedSession]:
    """The sessions that may teach everybody: those whose search had no payload filter."""
    return [s for s in sessions if not s.filtered]


def clicking_clients(sessions: Iterable[LoggedSession]) -> dict[tuple[str, str], set[str]]:
    """(normalised query, item) -> the distinct clients that clicked it."""
    out: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in sessions:
        query = normalise_query(s.query)
        for item in s.clicked:
            out[(query, item)].add(s.learning_client)
    return out


def too_few_clients(sessions: Iterable[LoggedSession], min_clients: int) -> set[tuple[str, str]]:
    """Clicked pairs that fewer than `min_clients` distinct clients clicked: they do not teach yet."""
    return {pair for pair, clients in clicking_clients(sessions).items() if len(clients) < min_clients}


def without_pairs(session: LoggedSession, pairs: set[tuple[str, str]]) -> LoggedSession:
    """The session as if these (query, item) pairs had never been shown in it."""
    query = normalise_query(session.query)
    gone = {item for _, item in session.shown if (query, item) in pairs}
    if not gone:
        return session
    return dataclasses.replace(session, shown=[(r, i) for r, i in session.shown if i not in gone],
                               clicked=session.clicked - gone)


@dataclass
class GuardedLog:
    """The sessions a fine-tune may learn from, and what the guards left out (for its log)."""

    sessions: list[LoggedSession]
    dropped: dict[str, int] = field(default_factory=dict)


def teaching_sessions(sessions: list[LoggedSession], guards: LearningSettings) -> GuardedLog:
    """The fine-tune's view of a click log (training set and gate alike), order kept: no filtered
    session; per client at most `max_votes_per_client` sessions per query and `max_sessions_per_client`
    in all, the most recent kept; clicked pairs with fewer than `min_clients` clients taken out."""
    kept = unfiltered(sessions)
    per_query: Counter = Counter()
    per_client: Counter = Counter()
    chosen: set[int] = set()
    newest_first = sorted(range(len(kept)), key=lambda n: (kept[n].created_at is not None, kept[n].created_at or 0,
                                                           kept[n].session_id), reverse=True)
    for n in newest_first:
        client, query = kept[n].learning_client, normalise_query(kept[n].query)
        if per_query[(client, query)] >= guards.max_votes_per_client or \
                per_client[client] >= guards.max_sessions_per_client:
            continue
        per_query[(client, query)] += 1
        per_client[client] += 1
        chosen.add(n)
    capped = [s for n, s in enumerate(kept) if n in chosen]
    withheld = too_few_clients(capped, guards.min_clients)
    guarded = [g for g in (without_pairs(s, withheld) for s in capped) if g.shown]
    return GuardedLog(guarded, {"filtered": len(sessions) - len(kept), "over_client_caps": len(kept) - len(capped),
                                "pairs_with_too_few_clients": len(withheld),
                                "sessions_left_empty": len(capped) - len(guarded)})


def evidence_counts(sessions: Iterable[LoggedSession], guards: LearningSettings
                    ) -> list[tuple[str, str, int, int, int]]:
    """(query, item, rank, impressions, clicks) as the improvement loop's evidence holds them for these
    sessions and `evidence.counts_for_queries` reads them: unfiltered sessions, each client's counts per
    cell capped at `max_votes_per_client`, clicked pairs with fewer than `min_clients` clients left out."""
    sessions = unfiltered(sessions)
    cells: Counter = Counter()
    for s in sessions:
        query = normalise_query(s.query)
        for rank, item in s.shown:
            cells[(query, item, rank, s.learning_client, "n")] += 1
            cells[(query, item, rank, s.learning_client, "c")] += item in s.clicked
    withheld = too_few_clients(sessions, guards.min_clients)
    capped: Counter = Counter()
    for (query, item, rank, _, kind), count in cells.items():
        if (query, item) not in withheld:
            capped[(query, item, rank, kind)] += min(count, guards.max_votes_per_client)
    return sorted((q, i, r, capped[(q, i, r, "n")], capped[(q, i, r, "c")])
                  for q, i, r, kind in capped if kind == "n")
