"""One request cannot stall the service, and no 500s: filters bounded in width, a statement timeout on
every search, health answered from a cache, and the errors that were 500s answered 401 or 503."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydantic
import pytest
import ray
from fastapi import FastAPI
from fastapi.testclient import TestClient

from es_ray.config import AuthSettings, FilterLimits
from es_ray.data.dual_write import LifecycleMoved
from es_ray.serve import errors
from es_ray.serve.auth import Authenticator
from es_ray.serve.health_cache import HealthCache
from es_ray.serve.query_vectors import QueryVectors
from es_ray.store import db
from es_ray.store.filters import FilterError, compile_filter
from es_ray.store.blue_green import Target
from es_ray.store.search import SearchTimeout, search
from tests.helpers import COSTLY_FILTER, slow_collection

# The filter of the report: 70 `in` lists of 1,000 values (140,000 query parameters: past Postgres' 65,535).
SEVENTY_LISTS = {"and": [{"tag": {"in": [f"t{k}-{v}" for v in range(1000)]}} for k in range(70)]}
FIVE_THOUSAND_FIELDS = {f"field_{n}": n for n in range(5000)}
NON_ASCII_TOKEN = "u1.YQ.1.é"


# --- filter width (store/filters.py) ---------------------------------------------------------------

@pytest.mark.parametrize("filter_, limit", [
    (SEVENTY_LISTS, "max_values"),
    (FIVE_THOUSAND_FIELDS, "max_fields"),
    ({"and": [{"a": {"gt": n}} for n in range(300)]}, "max_leaves"),
    ({"a": {"in": list(range(1001))}}, "max_in_values"),
])
def test_a_filter_too_wide_is_refused_naming_the_limit(filter_, limit):
    with pytest.raises(FilterError, match=f"serve.filter_limits.{limit}"):
        compile_filter(filter_)


def test_limits_come_from_the_settings_and_cannot_exceed_one_query():
    wide = {"a": {"in": list(range(2000))}}
    with pytest.raises(FilterError, match="max_in_values"):
        compile_filter(wide)
    assert len(compile_filter(wide, limits=FilterLimits(max_in_values=2000))[1]) == 4000
    with pytest.raises(pydantic.ValidationError, match="query parameters"):
        FilterLimits(max_values=40_000)
    # Without limits (the store compiling a filter the API accepted) Postgres' own limit still holds.
    with pytest.raises(FilterError, match="query parameters"):
        compile_filter(SEVENTY_LISTS, limits=None)


# --- the health cache (serve/health_cache.py) -------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_health_is_checked_at_most_once_per_period():
    clock = FakeClock()
    cache = HealthCache(2.0, clock)
    answers = iter(range(100))
    assert [cache.get(lambda: next(answers)) for _ in range(50)] == [0] * 50
    clock.now = 1.9
    assert cache.get(lambda: next(answers)) == 0
    clock.now = 2.0
    assert cache.get(lambda: next(answers)) == 1
    assert cache.checks == 2


def test_requests_during_a_check_get_the_last_answer_and_one_check_runs():
    clock = FakeClock()
    cache = HealthCache(2.0, clock)
    cache.get(lambda: "old")
    clock.now = 5.0
    started, release, running = threading.Event(), threading.Event(), []

    def slow_check() -> str:
        running.append(1)
        started.set()
        release.wait(10)
        return "new"

    checker = threading.Thread(target=lambda: cache.get(slow_check))
    checker.start()
    assert started.wait(10)
    # While the check runs, 50 concurrent requests answer at once with the last answer, none checks.
    with ThreadPoolExecutor(10) as pool:
        during = list(pool.map(lambda _: cache.get(slow_check), range(50)))
    assert during == ["old"] * 50 and len(running) == 1
    release.set()
    checker.join(10)
    assert cache.get(slow_check) == "new" and cache.checks == 2


def test_before_the_first_check_requests_wait_for_it_instead_of_checking_again():
    cache = HealthCache(2.0)
    calls = []

    def check() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "ok"

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: cache.get(check), range(8))) == ["ok"] * 8
    assert len(calls) == 1


# --- query vectors kept by text (serve/query_vectors.py) -------------------------------------------

def blue_of(version: int) -> Target:
    return Target(version, f"items_v{version}", 4, f"/models/v{version}", 256)


class CountingEncoder:
    """embed(blue, text): a vector that differs on every call, as Triton's may in its last bits."""

    def __init__(self):
        self.calls: list[tuple[int, str]] = []

    def __call__(self, blue: Target, text: str) -> np.ndarray:
        self.calls.append((blue.model_version, text))
        return np.full(4, len(self.calls), dtype=np.float32)


def test_a_repeated_query_gets_the_same_vector_and_nobody_can_change_it():
    encoder = CountingEncoder()
    vectors = QueryVectors(encoder, entries=8)
    first = vectors.get(blue_of(1), "sleep and memory")
    assert all(vectors.get(blue_of(1), "sleep and memory") is first for _ in range(5))
    assert encoder.calls == [(1, "sleep and memory")]
    with pytest.raises(ValueError):
        first[0] = 0.0  # read-only: every later search of the text ranks by it
    # Another model version, or another text, is embedded afresh.
    assert vectors.get(blue_of(2), "sleep and memory")[0] == 2.0
    assert vectors.get(blue_of(1), "sleep and memory!")[0] == 3.0
    assert len(encoder.calls) == 3


def test_query_vectors_keep_at_most_their_entries_and_zero_keeps_none():
    encoder = CountingEncoder()
    vectors = QueryVectors(encoder, entries=3)
    for n in range(1000):  # a client sending a thousand distinct texts
        vectors.get(blue_of(1), f"query {n}")
    assert vectors.get(blue_of(1), "query 999")[0] == 1000.0  # recent: kept
    assert vectors.get(blue_of(1), "query 0")[0] == 1001.0  # least recently used: dropped, embedded again
    assert vectors._cached.cache_info().currsize == 3
    none_kept = CountingEncoder()
    off = QueryVectors(none_kept, entries=0)
    off.get(blue_of(1), "q")
    off.get(blue_of(1), "q")
    assert none_kept.calls == [(1, "q"), (1, "q")]


# --- errors that were 500s (serve/errors.py, serve/auth.py) ----------------------------------------

def test_a_non_ascii_user_token_is_simply_invalid():
    authenticator = Authenticator(AuthSettings(user_token_secret="s"))
    assert authenticator.token_user(NON_ASCII_TOKEN) is None
    token, _ = authenticator.issue_token("u1")
    assert authenticator.token_user(token) == "u1"


def error_app(raise_error) -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.get("/fails")
    def fails():
        raise_error()

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("error, status, retry_after", [
    (LifecycleMoved("the delete could not complete in 5 attempts"), 503, "1"),
    (SearchTimeout("the search took longer than 3000 ms"), 503, "2"),
])
def test_domain_errors_are_503_with_retry_after(error, status, retry_after):
    def raise_error():
        raise error

    response = error_app(raise_error).get("/fails")
    assert response.status_code == status
    assert response.headers["Retry-After"] == retry_after
    assert str(error) in response.json()["error"]


@pytest.mark.parametrize("error", [ray.exceptions.ActorDiedError(),
                                   ray.exceptions.ActorUnavailableError("restarting", None),
                                   ray.exceptions.RayActorError()])
def test_a_dead_or_restarting_driver_is_503(monkeypatch, error):
    def dead(ref):
        raise error

    monkeypatch.setattr(errors.ray, "get", dead)
    response = error_app(lambda: errors.driver_call(object())).get("/fails")
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.json()["error"].startswith("lifecycle driver unavailable")


# --- the statement timeout (store/search.py), on a database of its own ------------------------------

def test_a_slow_search_is_cancelled_at_its_statement_timeout(scratch_database):
    dsn = scratch_database("esr_bounds_timeout")
    db.migrate(dsn)
    with db.connect(dsn) as conn:
        collection, vectors = slow_collection(conn)
        costly = COSTLY_FILTER
        with pytest.raises(SearchTimeout, match="postgres.search_timeout_ms"):
            search(conn, collection, vectors[0], 10, filter_=costly, timeout_ms=1)
        # The timeout was the search's own: the connection works and has no timeout left.
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "0"
        hits = search(conn, collection, vectors[0], 10, filter_=costly, timeout_ms=60_000)
        assert hits[0].id == "i0"


# --- end to end, on the real stack -------------------------------------------------------------------

def test_seventy_in_lists_are_refused_before_parsing_and_five_are_a_422_naming_the_limit(anon):
    # 840 KB of filter: refused by its size before a byte of it is parsed (parsing it is what would cost).
    response = anon.post("/v1/search", json={"query": "anything", "filter": SEVENTY_LISTS})
    assert response.status_code == 413, response.text
    assert "serve.max_search_body_bytes" in response.json()["error"]
    five = {"and": [{"tag": {"in": [f"{k}-{v}" for v in range(1000)]}} for k in range(5)]}   # 5,000 values
    response = anon.post("/v1/search", json={"query": "anything", "filter": five})
    assert response.status_code == 422, response.text
    assert "serve.filter_limits.max_values" in response.json()["error"]


def test_a_filter_over_5000_fields_is_a_422_naming_the_limit(anon):
    response = anon.post("/v1/search", json={"query": "anything", "filter": FIVE_THOUSAND_FIELDS})
    assert response.status_code == 422, response.text
    assert "serve.filter_limits.max_fields" in response.json()["error"]


def test_a_filter_within_the_limits_still_searches(anon):
    response = anon.post("/v1/search", json={"query": "anything", "session": False,
                                             "filter": {"tag": {"in": [f"t{v}" for v in range(1000)]}}})
    assert response.status_code == 200, response.text


def test_a_non_ascii_user_token_is_a_401_with_a_message(anon):
    response = anon.post("/v1/search", json={"query": "anything"},
                         headers={"X-User-Token": NON_ASCII_TOKEN.encode("utf-8")})
    assert response.status_code == 401, response.text
    assert "invalid or expired user token" in response.json()["error"]


def test_healthz_under_200_concurrent_requests_checks_once_per_period(anon, settings):
    period = settings.serve.health_cache_s
    started = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(lambda _: anon.get("/healthz"), range(200)))
    elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 200
    checks = {r.json()["checked_at"] for r in responses}
    # One check per period at most, plus the one made before this burst started.
    assert len(checks) <= elapsed / period + 2, (len(checks), elapsed)


def test_upsert_embeds_before_it_takes_a_connection_and_still_writes(api, probe_items):
    # probe_items went through PUT /v1/items (pipeline.upsert_now -> dual_write.write_items) and is
    # deleted through DELETE /v1/items after the module.
    response = api.post("/v1/search", json={"query": "protein folding in cells", "session": False, "limit": 30})
    assert response.status_code == 200, response.text
    found = {hit["id"] for hit in response.json()["results"]}
    assert {f"probe-{n:02d}" for n in range(0, 24, 6)} <= found
