"""The improvement loop: consumes settled sessions exactly once and updates the vectors they touched.

One pass (`improve_once`) runs in one transaction:
1. take an advisory lock for the collection (a second loop started by mistake skips the pass, so two
   loops never read-modify-write the same vectors),
2. claim up to `batch_sessions` sessions older than `settle_s` with `FOR UPDATE SKIP LOCKED`, leaving
   out the sources in learning.exclude_sources,
3. anonymous sessions without a filter: add their impressions and clicks, per client, to the click
   evidence (store/evidence.py) and recompute the click memories of the items they showed (memory.py):
   every item's global vectors are its model vectors plus what all the queries that clicked it say,
   weighted by the click model's P(relevant), so what one query's users teach reaches similar queries
   nobody clicked. The evidence is read through the learning guards (train/learning_guards.py): a pair
   teaches once several distinct clients clicked it, each client's votes capped,
4. a user's sessions, filtered or not: adjust that user's own copies of the vectors (adjuster.py;
   anchored at the global ones), so one user's clicks never change what others see, and count their
   labels in the user evidence (store/user_evidence.py), from which a reindex re-derives them,
5. the same on every other live collection it is given (`Follower`: green, until it is switched to),
   through that collection's own model,
6. mark the sessions improved (retention, store/retention.py, may prune them from then on).
A pass takes at most `batch_sessions` sessions and `max_pass_results` shown results, so its memory is
bounded however long the backlog and however many results a session showed.
A crash anywhere rolls the whole pass back, so a session is applied once or not at all, across restarts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import psycopg

from es_ray.config import LearningSettings, MemorySettings
from es_ray.improve.adjuster import CLICKED, IRRELEVANT, SKIPPED, Examples, VectorAdjuster
from es_ray.improve.memory import clicked_pair_weights, item_memories, remembered
from es_ray.logs import get_logger
from es_ray.periodic import Periodic
from es_ray.store import blue_green, clickstream, evidence, locks, user_evidence
from es_ray.store.clickstream import LoggedSession
from es_ray.store.collections import Collection
from es_ray.train.config import load_finetune_config
from es_ray.train.learning_guards import unfiltered
from es_ray.train.propensity import Impressions, Propensities

log = get_logger(__name__)


def labelled(session: LoggedSession) -> list[tuple[str, int]]:
    """(object id, kind): clicks; shown items above the lowest click that were not clicked; or, for a
    session marked irrelevant without clicks, everything shown. Sessions with neither teach nothing."""
    if session.clicked:
        out = [(item, CLICKED) for _, item in session.shown if item in session.clicked]
        return out + [(item, SKIPPED) for item in session.skipped_above()]
    if session.irrelevant:
        return [(item, IRRELEVANT) for _, item in session.shown]
    return []


KIND_NAMES = {CLICKED: "clicked", SKIPPED: "skipped", IRRELEVANT: "irrelevant"}
KINDS = {name: kind for kind, name in KIND_NAMES.items()}


def taught(session: LoggedSession) -> user_evidence.TaughtSession:
    """A user's session as the user evidence counts it: its labels, each skip tied to the session's top
    click (the pairwise term's partner in `adjustment_examples`)."""
    labels = labelled(session)
    top_click = next((item for item, kind in labels if kind == CLICKED), "")
    return user_evidence.TaughtSession(session.user_id, session.source, session.query, [
        user_evidence.Lesson(item, KIND_NAMES[kind], top_click if kind == SKIPPED else "") for item, kind in labels])


def adjustment_examples(sessions: list[LoggedSession], query_vectors: dict[str, np.ndarray],
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


@dataclass
class Learning:
    """How sessions change vectors: click memories for everyone, the adjuster for each user."""

    adjuster: VectorAdjuster
    memory: MemorySettings
    examination: list[float]      # examination probability by rank (the click model's prior)
    exclude_sources: tuple[str, ...] = ()   # sessions recorded by these are never learned from
    guards: LearningSettings = field(default_factory=LearningSettings)   # min_clients and the per-client caps


@dataclass
class Follower:
    """Another live collection a pass teaches too (green, building or waiting for its switch), with its
    own model's query encoder: vectors of two models never mix."""

    collection: Collection
    embed_queries: Callable


def improvement_lock(collection: Collection) -> str:
    """One improvement pass (or undo) per collection at a time."""
    return f"es-ray-improve-{collection.name}"


def improve_once(conn: psycopg.Connection, collection: Collection, embed_queries, learning: Learning,
                 batch_sessions: int = 256, settle_s: float = 5.0, max_pass_results: int | None = None,
                 followers: Sequence[Follower] = ()) -> dict[str, Any]:
    """One pass; returns counts. `embed_queries(texts) -> (n, dim)` is the blue query encoder."""
    started = time.monotonic()
    with conn.transaction():
        if not locks.try_transaction_lock(conn, improvement_lock(collection)):
            return {"sessions": 0, "busy": True}
        sessions = clickstream.claim_unimproved(conn, batch_sessions, settle_s, learning.exclude_sources,
                                                max_results=max_pass_results)
        if not sessions:
            return {"sessions": 0}
        anonymous = [s for s in sessions if s.user_id is None]
        teaching = unfiltered(anonymous)   # a filtered session is consumed and teaches nobody
        live = collection.hold_live(conn, {item for s in teaching for _, item in s.shown})
        evidence.record(conn, teaching, live)
        shown = sorted(live)
        remembered_items = refresh_memories(conn, collection, shown, embed_queries, learning)
        users_sessions = [s for s in sessions if s.user_id is not None]
        personal = apply_user_sessions(conn, collection, users_sessions, embed_queries, learning.adjuster)
        for follower in followers:
            follow(conn, follower, shown, users_sessions, learning)
        user_evidence.record(conn, [taught(s) for s in users_sessions])
        clickstream.mark_improved(conn, [s.session_id for s in sessions])
    result = {"sessions": len(sessions), "anonymous": len(anonymous),
              "anonymous_filtered": len(anonymous) - len(teaching), "items_remembered": remembered_items,
              "vectors_personal": personal, "seconds": round(time.monotonic() - started, 3)}
    log.info("improve.pass", collection=collection.name, **result)
    return result


def follow(conn: psycopg.Connection, follower: Follower, items: list[str], user_sessions: list[LoggedSession],
           learning: Learning) -> None:
    """The pass's sessions on another live collection. Click memories at once (they are recomputed from
    the evidence, and a reindex derives them again for what it copies later); users' sessions only once
    the reindex handed them over (blue_green.hand_users_to_passes): before, its replay teaches them,
    and applying them here too would count them twice. Holds that collection's improvement lock, as
    the replay does."""
    locks.transaction_lock(conn, improvement_lock(follower.collection))
    refresh_memories(conn, follower.collection, items, follower.embed_queries, learning)
    if blue_green.users_learned_since(conn, follower.collection.name) is not None:
        apply_user_sessions(conn, follower.collection, user_sessions, follower.embed_queries, learning.adjuster)


def refresh_memories(conn: psycopg.Connection, collection: Collection, items: list[str], embed_queries,
                     learning: Learning) -> int:
    """Recomputes the global vectors of `items` from the click evidence: model vectors plus click
    memory (memory.py). The click model's P(relevant) is fitted on every result the queries that
    clicked these items showed (whole result lists, so its prior by rank is not biased towards
    clicked items). Items left without a memory get their model vectors back. Returns how many
    items now carry a memory."""
    if not items:
        return 0
    keys = evidence.queries_that_clicked(conn, items)
    counts = evidence.counts_for_queries(conn, keys, max_votes_per_client=learning.guards.max_votes_per_client,
                                         min_clients=learning.guards.min_clients)
    weights = clicked_pair_weights(Impressions.from_counts(counts),
                                   Propensities(np.asarray(learning.examination), "config"))
    wanted = set(items)
    weights = {pair: w for pair, w in weights.items() if pair[1] in wanted}
    texts = evidence.query_texts(conn, sorted({q for q, _ in weights}))
    ordered = sorted(texts)
    vectors = dict(zip(ordered, embed_queries([texts[q] for q in ordered]))) if ordered else {}
    memories = item_memories(vectors, weights)
    # Only items that get a memory or lose one: the rest keep their model vectors untouched.
    changed = sorted(set(memories) | collection.adjusted(conn, items))
    model_vectors = collection.chunk_vectors(conn, changed, model=True)
    updates = []
    for object_id, chunks in model_vectors.items():
        parts = [p for p, _ in chunks]
        stacked = np.stack([v for _, v in chunks])
        if object_id in memories:
            stacked = remembered(stacked, memories[object_id], learning.memory.weight, learning.memory.evidence_half)
        updates += [(object_id, p, v) for p, v in zip(parts, stacked)]
    collection.save_global(conn, updates, model_vectors.versions)  # not onto an item rewritten since
    return sum(1 for o in model_vectors if o in memories)


def apply_user_sessions(conn: psycopg.Connection, collection: Collection, sessions: list[LoggedSession],
                        embed_queries, adjuster: VectorAdjuster) -> int:
    """Adjusts each user's own copies of the vectors their sessions touched; returns how many."""
    useful = [s for s in sessions if s.user_id is not None and labelled(s)]
    if not useful:
        return 0
    vectors = embed_queries([s.query for s in useful])
    query_vectors = {s.session_id: v for s, v in zip(useful, vectors)}
    by_user: dict[str, list[LoggedSession]] = defaultdict(list)
    for s in useful:
        by_user[s.user_id].append(s)
    return sum(adjust_user(conn, collection, user_id, sorted({item for s in group for item, _ in labelled(s)}),
                           lambda seen, group=group: adjustment_examples(group, query_vectors, seen), adjuster)
               for user_id, group in by_user.items())


def adjust_user(conn: psycopg.Connection, collection: Collection, user_id: str, items: list[str], examples_from,
                adjuster: VectorAdjuster) -> int:
    """Adjusts one user's own copies of `items`' vectors by the examples `examples_from(their chunk vectors
    as the user sees them)` gives ((keys, vectors, Examples)); returns how many vectors."""
    seen = collection.chunk_vectors(conn, items, user_id)
    keys, current, examples = examples_from(seen)
    if not keys:
        return 0
    # Anchored at the global vectors: a user's copies stay close to what everyone sees.
    anchors = collection.chunk_vectors(conn, items, None)
    anchor = np.stack([dict(anchors[o])[p] for o, p in keys])
    new = adjuster.adjust(current, anchor, examples)
    collection.save_user(conn, user_id, [(o, p, v) for (o, p), v in zip(keys, new)], seen.versions)
    return len(keys)


def evidence_examples(groups: list[user_evidence.UserQuery], query_vectors: dict[str, np.ndarray],
                      chunks: dict[str, list[tuple[int, np.ndarray]]]):
    """`adjustment_examples` from counted evidence: one example per counted label, weighted by its
    sessions, on the chunk of each item that best matches the query. A skip whose top click has been
    deleted since teaches nothing (it has nothing to rank below)."""
    keys: list[tuple[str, int]] = []
    index: dict[tuple[str, int], int] = {}
    queries, chunk_idx, kinds, best, weights = [], [], [], [], []

    def example(q: np.ndarray, item: str, kind: int, best_click: int, weight: int) -> int:
        part_no, _ = max(chunks[item], key=lambda pv: float(pv[1] @ q))
        if (item, part_no) not in index:
            index[(item, part_no)] = len(keys)
            keys.append((item, part_no))
        queries.append(q), chunk_idx.append(index[(item, part_no)]), kinds.append(kind), best.append(best_click)
        weights.append(weight)
        return len(kinds) - 1

    for group in groups:
        q = query_vectors[group.query]
        lessons = sorted(group.lessons.items(), key=lambda ln: (KINDS[ln[0].kind], ln[0].object_id, ln[0].above))
        clicks = {}
        for lesson, count in lessons:
            if lesson.object_id not in chunks:
                continue  # deleted since
            if lesson.kind == "clicked":
                clicks[lesson.object_id] = example(q, lesson.object_id, CLICKED, -1, count)
            elif lesson.kind == "irrelevant":
                example(q, lesson.object_id, IRRELEVANT, -1, count)
            elif lesson.above in clicks:   # clicks sort before skips
                example(q, lesson.object_id, SKIPPED, clicks[lesson.above], count)
    vectors = np.stack([dict(chunks[o])[p] for o, p in keys]) if keys else np.zeros((0, 0), np.float32)
    examples = Examples(np.asarray(queries, dtype=np.float32), np.asarray(chunk_idx), np.asarray(kinds),
                        np.asarray(best), np.asarray(weights, dtype=np.float32))
    return keys, vectors, examples


def apply_user_evidence(conn: psycopg.Connection, collection: Collection, groups: list[user_evidence.UserQuery],
                        embed_queries, adjuster: VectorAdjuster) -> int:
    """Adjusts each user's own copies of the vectors from their counted evidence (a page of it); returns
    how many vectors."""
    texts = sorted({g.query for g in groups})
    query_vectors = dict(zip(texts, embed_queries(texts))) if texts else {}
    by_user: dict[str, list[user_evidence.UserQuery]] = defaultdict(list)
    for group in groups:
        by_user[group.user_id].append(group)
    return sum(adjust_user(conn, collection, user_id, sorted({ln.object_id for g in user_groups for ln in g.lessons}),
                           lambda seen, user_groups=user_groups: evidence_examples(user_groups, query_vectors, seen),
                           adjuster)
               for user_id, user_groups in by_user.items())


def rederive(conn: psycopg.Connection, collection: Collection, embed_queries, learning: Learning, batch: int,
             progress=lambda _: None, evidence_reader: psycopg.Connection | None = None) -> dict[str, int]:
    """Everything learned from clicks, derived again on a new model's collection with its own query
    vectors (vectors of two models never mix): click memories from the click evidence, then the users'
    adjustments from the user evidence, `batch` (user, query) groups at a time, read through
    `evidence_reader` (a connection whose snapshot holds the evidence counted before the passes took
    over teaching this collection users' sessions: reindex.handed_over_evidence; default `conn`).
    Neither reads the sessions, so pruning them (store/retention.py) changes nothing here. Each batch
    holds the collection's improvement lock: a pass teaching it meanwhile never interleaves."""
    totals = {"items_remembered": 0, "user_sessions": 0, "vectors_personal": 0}
    after = None
    while items := evidence.clicked_items(conn, after, batch):
        with conn.transaction():
            locks.transaction_lock(conn, improvement_lock(collection))
            totals["items_remembered"] += refresh_memories(conn, collection, items, embed_queries, learning)
        after = items[-1]
        progress({"stage": "re-deriving click memories", **totals})
    cursor = None
    while True:
        groups, cursor = user_evidence.page(evidence_reader or conn, cursor, batch, learning.exclude_sources)
        if not groups:
            return totals
        with conn.transaction():
            locks.transaction_lock(conn, improvement_lock(collection))
            # A user forgotten since the snapshot (improve/forgetting.py) is not replayed.
            kept = user_evidence.remembered_users(conn, sorted({g.user_id for g in groups}))
            groups = [g for g in groups if g.user_id in kept]
            totals["vectors_personal"] += apply_user_evidence(conn, collection, groups, embed_queries,
                                                              learning.adjuster)
        totals["user_sessions"] += sum(g.sessions for g in groups)
        progress({"stage": "re-deriving users' adjustments", **totals})


def undo(conn: psycopg.Connection, collection: Collection) -> dict[str, int]:
    """Forgets what anonymous clicks taught: the model's vectors back, the evidence gone (so a later
    pass cannot bring it back). Users' own adjustments stay (DELETE /v1/users/{id}/personalisation)."""
    with conn.transaction():
        # The pass's lock: a pass that read the evidence before the clear cannot write memories after it.
        locks.transaction_lock(conn, improvement_lock(collection))
        return {"restored_vectors": collection.undo_global(conn), "evidence_cells": evidence.clear(conn)}


class ImprovementLoop(Periodic):
    """Every `interval_s`: improvement passes (`run_pass`, `improve_once` on blue) until the backlog of
    settled sessions is empty. A failed pass rolled back; the next interval tries again. While no session
    comes, the interval doubles up to `max_interval_s` (periodic.py)."""

    def __init__(self, run_pass, interval_s: float, max_interval_s: float | None = None):
        self.run_pass = run_pass
        super().__init__(self._drain, interval_s, "improvement-loop", max_interval_s)

    def _drain(self) -> bool:
        """True when a pass learned from sessions (more may come soon)."""
        learned = False
        while self.run_pass().get("sessions", 0) > 0:
            learned = True
        return learned


def learning_from(settings) -> Learning:
    return Learning(VectorAdjuster(settings.improve.adjuster), settings.improve.memory,
                    load_finetune_config().debias.examination_prior, tuple(settings.learning.exclude_sources),
                    settings.learning)
