"""Retention and bounded passes (issue 16): sessions are pruned by age and count once what they taught is
kept as counts, a reindex re-derives users' adjustments from those counts alone, a session shows at most
serve.max_results_per_session results, and an improvement pass takes a bounded number of results."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
from pydantic import ValidationError

from es_ray.config import RetentionSettings, ServeSettings, load_settings
from es_ray.improve.adjuster import CLICKED, SKIPPED, Examples, VectorAdjuster
from es_ray.improve.loop import improve_once, learning_from, rederive, taught
from es_ray.serve import schemas
from es_ray.store import clickstream, db, retention, user_evidence
from es_ray.store.clickstream import Provenance
from es_ray.store.collections import Collection, EmbeddedItem

DIM = 8
SERVED = Provenance("served", None, "127.0.0.9")


# --- without a stack -----------------------------------------------------------------------------------------

def test_a_session_with_more_results_than_the_cap_is_refused_naming_the_limit():
    def request(n: int) -> dict:
        return {"query": "q", "results": [{"id": f"i{r}", "rank": r} for r in range(1, n + 1)]}

    assert ServeSettings().max_results_per_session == 100 == ServeSettings().max_limit   # what search shows
    schemas.SessionRequest.model_validate(request(100))
    with pytest.raises(ValidationError, match=r"101 results in one session; the limit is 100 \(serve.max_results_per"):
        schemas.SessionRequest.model_validate(request(101))
    kept = schemas.LIMITS
    try:
        schemas.configure_limits(ServeSettings(max_results_per_session=5))
        with pytest.raises(ValidationError, match="the limit is 5"):
            schemas.SessionRequest.model_validate(request(6))
    finally:
        schemas.configure_limits(kept)


def test_a_weighted_example_moves_vectors_as_far_as_the_example_repeated():
    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)   # noqa: E731
    q, vectors = unit(rng.normal(size=DIM)).astype(np.float32), unit(rng.normal(size=(2, DIM))).astype(np.float32)
    repeated = Examples(np.stack([q] * 4), np.array([0, 0, 0, 1]), np.array([CLICKED] * 3 + [SKIPPED]),
                        np.array([-1, -1, -1, 0]))
    weighted = Examples(np.stack([q, q]), np.array([0, 1]), np.array([CLICKED, SKIPPED]), np.array([-1, 0]),
                        np.array([3.0, 1.0], dtype=np.float32))
    once = Examples(np.stack([q, q]), np.array([0, 1]), np.array([CLICKED, SKIPPED]), np.array([-1, 0]))
    adjuster = VectorAdjuster()
    assert np.allclose(adjuster.adjust(vectors, vectors, weighted), adjuster.adjust(vectors, vectors, repeated),
                       atol=1e-6)
    assert not np.allclose(adjuster.adjust(vectors, vectors, once), adjuster.adjust(vectors, vectors, repeated),
                           atol=1e-4)


def test_retention_and_pass_bounds_are_settings():
    settings = load_settings()
    assert settings.retention == RetentionSettings()           # configs/stack.yaml says what the defaults say
    assert settings.improve.max_pass_results >= settings.serve.max_results_per_session
    with pytest.raises(ValidationError):
        RetentionSettings(max_age_days=0)


# --- the store, on a database of its own ---------------------------------------------------------------------

def embed_queries(texts):
    """A tiny stand-in for the query encoder: one fixed unit vector per text."""
    out = []
    for text in texts:
        rng = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
        vector = rng.normal(size=DIM)
        out.append(vector / np.linalg.norm(vector))
    return np.asarray(out, dtype=np.float32)


ITEMS = [f"doc-{n:02d}" for n in range(12)]


def make_collection(conn, name: str) -> Collection:
    """Twelve items of two chunks each, the same vectors in every collection made here."""
    collection = Collection(name, DIM)
    collection.create(conn, index=False)
    rng = np.random.default_rng(11)
    items = []
    for object_id in ITEMS:
        chunks = rng.normal(size=(2, DIM)).astype(np.float32)
        items.append(EmbeddedItem(object_id, {}, chunks / np.linalg.norm(chunks, axis=1, keepdims=True)))
    collection.upsert(conn, items)
    return collection


def user_vectors(conn, collection: Collection) -> dict[tuple[str, str, int], np.ndarray]:
    return {(u, o, p): v.to_numpy() for u, o, p, v in conn.execute(
        f"SELECT user_id, object_id, part_no, vector FROM user_parts_{collection.name} ORDER BY 1, 2, 3")}


@pytest.fixture()
def conn(scratch_database):
    dsn = scratch_database("esr_retention")
    db.migrate(dsn)
    with db.connect(dsn) as connection:
        yield connection


def record(conn, user: str | None, query: str, shown: list[str], clicked: list[str] = (), irrelevant=False,
           provenance: Provenance = SERVED, age_days: float = 0) -> str:
    sid = f"s-{uuid.uuid4().hex[:10]}"
    clickstream.record_session(conn, sid, user, query, 1, [(r, o) for r, o in enumerate(shown, 1)], provenance)
    if clicked:
        clickstream.add_events(conn, sid, [(f"e{n}", o, "click") for n, o in enumerate(clicked)])
    if irrelevant:
        clickstream.mark_irrelevant(conn, sid)
    conn.execute("UPDATE sessions SET created_at = now() - make_interval(secs => %s) WHERE session_id = %s",
                 (age_days * 86_400 + 60, sid))
    return sid


def test_pruned_sessions_leave_their_lessons_and_a_rederive_gives_the_same_user_vectors(conn):
    learning = learning_from(load_settings())
    blue = make_collection(conn, "blue")
    for n in range(6):   # ann's and bob's sessions, an irrelevant one, and anonymous ones
        record(conn, "ann", "glacier melt", ITEMS[n:n + 5], clicked=[ITEMS[n + 3]], age_days=200)
        record(conn, "bob", f"sea level {n % 2}", ITEMS[6:12], clicked=[ITEMS[8], ITEMS[10]], age_days=200)
        record(conn, None, "glacier melt", ITEMS[0:6], clicked=[ITEMS[4]], age_days=200,   # six people
               provenance=Provenance("served", None, f"127.0.0.{20 + n}"))
    record(conn, "bob", "ice sheets", ITEMS[0:4], irrelevant=True, age_days=200)
    while improve_once(conn, blue, embed_queries, learning, batch_sessions=5, settle_s=0)["sessions"]:
        pass
    assert conn.execute("SELECT count(*) FROM sessions WHERE improved_at IS NULL").fetchone()[0] == 0

    before = make_collection(conn, "before")
    totals_before = rederive(conn, before, embed_queries, learning, batch=2)
    vectors_before = user_vectors(conn, before)
    assert {u for u, _, _ in vectors_before} == {"ann", "bob"}
    assert totals_before["user_sessions"] == 13 and totals_before["items_remembered"] >= 1
    global_vectors = before.chunk_vectors(conn, ITEMS)
    assert any(not np.allclose(v, dict(global_vectors[o])[p], atol=1e-4)       # the users' clicks taught
               for (_, o, p), v in vectors_before.items())

    pruned = retention.prune(conn, RetentionSettings(max_age_days=30))
    assert pruned.by_age == 19 and pruned.finished
    assert conn.execute("SELECT count(*) FROM sessions").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM session_results").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0

    after = make_collection(conn, "after")
    assert rederive(conn, after, embed_queries, learning, batch=2) == totals_before
    vectors_after = user_vectors(conn, after)
    assert vectors_after.keys() == vectors_before.keys()
    for key, vector in vectors_before.items():
        assert np.allclose(vectors_after[key], vector, atol=1e-6), key
    for object_id, chunks in after.chunk_vectors(conn, ITEMS).items():   # click memories too
        assert all(np.allclose(v, dict(global_vectors[object_id])[p], atol=1e-6) for p, v in chunks)

    # An excluded source is left out of the replay, as it was of the session replay.
    excluded = make_collection(conn, "excluded")
    learning_without_served = learning_from(load_settings(learning={"exclude_sources": ["served"]}))
    assert rederive(conn, excluded, embed_queries, learning_without_served, batch=2)["user_sessions"] == 0
    assert user_vectors(conn, excluded) == {}


def test_the_migration_counts_sessions_improved_before_it_as_the_improvement_loop_does(conn):
    shown = ITEMS[:5]
    sessions = [record(conn, "ann", "glacier melt", shown, clicked=[shown[3], shown[1]]),
                record(conn, "ann", "glacier melt", shown, clicked=[shown[2]]),
                record(conn, "ann", "Glacier  melt", shown, irrelevant=True),
                record(conn, "ann", "glacier melt", shown, clicked=[shown[0]], irrelevant=True),
                record(conn, "bob", "glacier melt", shown),                       # taught nothing
                record(conn, None, "glacier melt", shown, clicked=[shown[0]])]    # anonymous: click evidence
    with conn.transaction():
        logged = clickstream.claim_unimproved(conn, 100, 0)
        user_evidence.record(conn, [taught(s) for s in logged if s.user_id is not None])
        clickstream.mark_improved(conn, sessions)

    def counted():
        queries = conn.execute("SELECT user_id, source, query, sessions FROM user_queries ORDER BY 1, 2, 3").fetchall()
        cells = conn.execute("SELECT user_id, source, query_md5, object_id, kind, above, sessions FROM user_evidence "
                             "ORDER BY 1, 2, 3, 4, 5, 6").fetchall()
        return queries, cells

    by_the_loop = counted()
    assert by_the_loop[0] == [("ann", "served", "Glacier  melt", 1), ("ann", "served", "glacier melt", 3)]
    assert ("ann", "served", hashlib.md5(b"glacier melt").hexdigest(), shown[2], "skipped", shown[1], 1) \
        in by_the_loop[1]
    # Migration 4 once more, on the same sessions: its SQL labels them as the loop did.
    conn.execute("DROP TABLE user_evidence, user_queries; DROP INDEX sessions_created; "
                 "DELETE FROM schema_migrations WHERE version = 4")
    db.migrate(conn.info.dsn)
    assert counted() == by_the_loop


def test_retention_by_age_and_count_prunes_only_what_was_learned_or_is_excluded(conn):
    old_learned = [record(conn, None, "q", ITEMS[:3], age_days=100 + n) for n in range(3)]
    old_waiting = record(conn, None, "q", ITEMS[:3], age_days=100)
    old_excluded = record(conn, None, "q", ITEMS[:3], age_days=100, provenance=Provenance("unverified"))
    new_learned = [record(conn, "ann", "q", ITEMS[:3], age_days=10 - n) for n in range(4)]
    new_waiting = record(conn, None, "q", ITEMS[:3], age_days=1)
    clickstream.mark_improved(conn, old_learned + new_learned)

    def left() -> set[str]:
        return {r[0] for r in conn.execute("SELECT session_id FROM sessions")}

    # By age, at most delete_batch * max_batches a call: the rest waits for the next call.
    policy = RetentionSettings(max_age_days=30, max_sessions=None, delete_batch=2, max_batches=1)
    first = retention.prune(conn, policy, ["unverified"])
    assert (first.by_age, first.finished) == (2, False)
    assert left() >= {old_waiting, *new_learned, new_waiting}
    second = retention.prune(conn, policy, ["unverified"])
    assert (second.by_age, second.finished) == (2, True)
    assert left() == {old_waiting, *new_learned, new_waiting}      # waiting for the loop: kept, however old

    # By count: the oldest learned sessions go until max_sessions are left; waiting ones never.
    bounded = retention.prune(conn, RetentionSettings(max_age_days=None, max_sessions=4, delete_batch=1,
                                                      max_batches=1))
    assert (bounded.by_count, bounded.finished) == (1, False)
    assert new_learned[0] not in left()
    by_count = retention.prune(conn, RetentionSettings(max_age_days=None, max_sessions=4), ["unverified"])
    assert (by_count.by_age, by_count.by_count, by_count.finished) == (0, 1, True)
    assert left() == {old_waiting, new_learned[2], new_learned[3], new_waiting}
    assert retention.prune(conn, RetentionSettings(max_age_days=None, max_sessions=0)).by_count == 2
    assert left() == {old_waiting, new_waiting}


def test_a_pass_takes_at_most_max_pass_results_shown_results(conn):
    blue = make_collection(conn, "blue")
    for _ in range(5):
        record(conn, None, "q", ITEMS[:10], clicked=[ITEMS[2]])
    with conn.transaction():
        assert len(clickstream.claim_unimproved(conn, 100, 0, max_results=25)) == 2
        assert len(clickstream.claim_unimproved(conn, 100, 0, max_results=5)) == 1   # one, however large
    learning = learning_from(load_settings())
    passes = []
    while (result := improve_once(conn, blue, embed_queries, learning, 100, 0, max_pass_results=25))["sessions"]:
        passes.append(result["sessions"])
    assert passes == [2, 2, 1]


# --- over HTTP, on the shared stack --------------------------------------------------------------------------

def test_post_sessions_with_too_many_results_is_a_422_naming_the_limit(api, settings):
    limit = settings.serve.max_results_per_session
    body = {"query": "too many", "session_id": f"big-{uuid.uuid4().hex[:8]}",
            "results": [{"id": f"x{n}", "rank": n} for n in range(1, limit + 2)]}
    response = api.post("/v1/sessions", json=body)
    assert response.status_code == 422, response.text
    assert f"the limit is {limit}" in response.json()["error"]
    assert "serve.max_results_per_session" in response.json()["error"]
    body["results"] = body["results"][:limit]
    assert api.post("/v1/sessions", json=body).status_code == 200
