"""The improvement loop: consumes settled sessions exactly once and updates the vectors they touched.

One pass (`improve_once`) runs in one transaction:
1. take an advisory lock for the collection (a second loop started by mistake skips the pass, so two
   loops never read-modify-write the same vectors),
2. claim up to `batch_sessions` sessions older than `settle_s` with `FOR UPDATE SKIP LOCKED`, leaving
   out the sources in learning.exclude_sources,
3. anonymous sessions: add their impressions and clicks to the click evidence (store/evidence.py)
   and recompute the click memories of the items they showed (memory.py): every item's global
   vectors are its model vectors plus what all the queries that clicked it say, weighted by the
   click model's P(relevant), so what one query's users teach reaches similar queries nobody clicked,
4. a user's sessions: adjust that user's own copies of the vectors (adjuster.py; anchored at the
   global ones), so one user's clicks never change what others see,
5. the same on every other live collection it is given (`Follower`: green, until it is switched to),
   through that collection's own model,
6. mark the sessions improved.
A crash anywhere rolls the whole pass back, so a session is applied once or not at all, across restarts.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import psycopg

from es_ray.config import MemorySettings
from es_ray.improve.adjuster import CLICKED, IRRELEVANT, SKIPPED, Examples, VectorAdjuster
from es_ray.improve.memory import clicked_pair_weights, item_memories, remembered
from es_ray.logs import get_logger
from es_ray.periodic import Periodic
from es_ray.store import blue_green, clickstream, evidence, locks
from es_ray.store.clickstream import LoggedSession
from es_ray.store.collections import Collection
from es_ray.train.config import load_finetune_config
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
                 batch_sessions: int = 256, settle_s: float = 5.0,
                 followers: Sequence[Follower] = ()) -> dict[str, Any]:
    """One pass; returns counts. `embed_queries(texts) -> (n, dim)` is the blue query encoder."""
    started = time.monotonic()
    with conn.transaction():
        if not locks.try_transaction_lock(conn, improvement_lock(collection)):
            return {"sessions": 0, "busy": True}
        sessions = clickstream.claim_unimproved(conn, batch_sessions, settle_s, learning.exclude_sources)
        if not sessions:
            return {"sessions": 0}
        anonymous = [s for s in sessions if s.user_id is None]
        live = collection.hold_live(conn, {item for s in anonymous for _, item in s.shown})
        evidence.record(conn, anonymous, live)
        shown = sorted(live)
        remembered_items = refresh_memories(conn, collection, shown, embed_queries, learning)
        personal = apply_user_sessions(conn, collection, [s for s in sessions if s.user_id is not None],
                                       embed_queries, learning.adjuster)
        for follower in followers:
            follow(conn, follower, shown, [s for s in sessions if s.user_id is not None], learning)
        clickstream.mark_improved(conn, [s.session_id for s in sessions])
    result = {"sessions": len(sessions), "anonymous": len(anonymous), "items_remembered": remembered_items,
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
    weights = clicked_pair_weights(Impressions.from_counts(evidence.counts_for_queries(conn, keys)),
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
    adjusted = 0
    for user_id, group in by_user.items():
        items = sorted({item for s in group for item, _ in labelled(s)})
        seen = collection.chunk_vectors(conn, items, user_id)
        keys, current, examples = adjustment_examples(group, query_vectors, seen)
        if not keys:
            continue
        # Anchored at the global vectors: a user's copies stay close to what everyone sees.
        anchors = collection.chunk_vectors(conn, items, None)
        anchor = np.stack([dict(anchors[o])[p] for o, p in keys])
        new = adjuster.adjust(current, anchor, examples)
        collection.save_user(conn, user_id, [(o, p, v) for (o, p), v in zip(keys, new)], seen.versions)
        adjusted += len(keys)
    return adjusted


def rederive(conn: psycopg.Connection, collection: Collection, embed_queries, learning: Learning, batch: int,
             progress=lambda _: None, improved_before=None) -> dict[str, int]:
    """Everything learned from clicks, derived again on a new model's collection with its own query
    vectors (vectors of two models never mix): click memories from the evidence, then the users'
    sessions improved before `improved_before` replayed (the passes teach the later ones). Each batch
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
        with conn.transaction():
            # Read under the lock too: a user forgotten meanwhile (improve/forgetting.py) is not replayed.
            locks.transaction_lock(conn, improvement_lock(collection))
            sessions, cursor = clickstream.improved_user_sessions(conn, cursor, batch, learning.exclude_sources,
                                                                  improved_before)
            totals["vectors_personal"] += apply_user_sessions(conn, collection, sessions, embed_queries,
                                                              learning.adjuster)
        if not sessions:
            return totals
        totals["user_sessions"] += len(sessions)
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
    settled sessions is empty. A failed pass rolled back; the next interval tries again."""

    def __init__(self, run_pass, interval_s: float):
        self.run_pass = run_pass
        super().__init__(self._drain, interval_s, "improvement-loop")

    def _drain(self) -> None:
        while self.run_pass().get("sessions", 0) > 0:
            pass


def learning_from(settings) -> Learning:
    return Learning(VectorAdjuster(settings.improve.adjuster), settings.improve.memory,
                    load_finetune_config().debias.examination_prior, tuple(settings.learning.exclude_sources))
