"""Rate limits per client and per session (es_ray/serve/rate_limits.py): the moving window and its
Retry-After, keys and limits counted apart, API keys exempt; the routes that are limited; the client's
source address and Retry-After (es_ray/client.py); and one check on the running stack."""

from __future__ import annotations

import http.server
import threading
import time

import httpx
import pydantic
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from limits import parse

from es_ray.client import EsRayClient, EsRayError
from es_ray.config import ApiKeyEntry, AuthSettings, RateLimitSettings, Settings
from es_ray.demo.addresses import MEASUREMENT, TRAFFIC, USERS, person_address
from es_ray.serve import auth, errors, rate_limits, schemas
from es_ray.serve.errors import RateLimited
from es_ray.serve.rate_limits import RateLimiter
from es_ray.serve.replica import replica

KEY = "esr_rate-limit-test-key"


# --- the limiter -------------------------------------------------------------------------------------

def test_a_window_admits_its_count_then_refuses_until_the_oldest_request_leaves_it():
    limiter = RateLimiter(RateLimitSettings(search="2 per 3 second"))
    started = time.time()
    limiter.charge("search", "a")
    time.sleep(1.2)
    limiter.charge("search", "a")
    with pytest.raises(RateLimited) as refused:
        limiter.charge("search", "a")
    # The first request leaves the window 3 s after it was sent: about 1.8 s from now, not a whole window.
    assert refused.value.retry_after_s == 2 and refused.value.name == "search"
    assert "2 requests per 3 seconds per client (serve.rate_limits.search)" in str(refused.value)
    time.sleep(max(0.0, started + 3.1 - time.time()))
    limiter.charge("search", "a")             # one slot freed: one request more, and only one
    with pytest.raises(RateLimited):
        limiter.charge("search", "a")


def test_refused_requests_take_no_slot():
    limiter = RateLimiter(RateLimitSettings(search="1 per 1 second"))
    limiter.charge("search", "a")
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.charge("search", "a")
    time.sleep(1.05)
    limiter.charge("search", "a")             # hammering did not push the window on


def test_clients_sessions_and_limits_are_counted_apart():
    limiter = RateLimiter(RateLimitSettings(search="1/minute", clickstream="1/minute", session_writes="1/minute"))
    limiter.charge("search", "127.0.0.5")
    with pytest.raises(RateLimited):
        limiter.charge("search", "127.0.0.5")
    limiter.charge("search", "127.0.0.6")                  # another client
    limiter.charge("clickstream", "127.0.0.5")             # another limit of the same client
    limiter.charge("session_writes", "s1.abc", per="session")
    with pytest.raises(RateLimited, match="per session"):
        limiter.charge("session_writes", "s1.abc", per="session")
    limiter.charge("session_writes", "s1.def", per="session")


@pytest.mark.parametrize("text", ["often", "0/minute", "-1/second"])
def test_a_limit_that_cannot_be_read_or_allows_nothing_is_refused_at_load(text):
    with pytest.raises(pydantic.ValidationError, match="search"):
        RateLimitSettings(search=text)


def test_the_configured_limits_read_and_leave_a_person_room():
    limits = {name: parse(text) for name, text in Settings().serve.rate_limits.model_dump().items()}
    assert set(limits) == {"search", "clickstream", "session_writes", "session_reads"}
    per_minute = {name: item.amount * 60 / item.get_expiry() for name, item in limits.items()}
    assert per_minute["search"] >= 30 and per_minute["clickstream"] >= 10 and per_minute["session_writes"] >= 5


# --- over HTTP: 429 with Retry-After, the API key exempt ---------------------------------------------

class StandInReplica:
    """What clients.client_identity reads of a replica: its settings."""

    settings = Settings()


@pytest.fixture()
def limited_app():
    """Routes charged as the real ones are, with small limits, behind the API's error handling."""
    saved = auth._authenticator, rate_limits._limiter
    auth.configure(AuthSettings(api_keys=[ApiKeyEntry(name="operator", sha256=auth.hash_key(KEY))],
                                user_token_secret="secret"))
    rate_limits.configure(RateLimitSettings(search="3/minute", clickstream="10/minute", session_writes="2/minute"))
    app = FastAPI()
    errors.install(app)
    app.dependency_overrides[replica] = StandInReplica

    @app.post("/search", dependencies=[Depends(rate_limits.search)])
    def search():
        return {"ok": True}

    @app.post("/sessions/{session_id}/events", dependencies=[Depends(rate_limits.clickstream),
                                                              Depends(rate_limits.session_writes)])
    def events(session_id: str):
        return {"ok": True}

    yield app
    auth._authenticator, rate_limits._limiter = saved


def test_over_the_limit_is_a_429_with_retry_after_and_the_limits_name(limited_app):
    farm = TestClient(limited_app, client=("127.0.0.5", 5000))
    other = TestClient(limited_app, client=("127.0.0.6", 5000))
    assert [farm.post("/search").status_code for _ in range(3)] == [200, 200, 200]
    refused = farm.post("/search")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert "serve.rate_limits.search" in refused.json()["error"] and refused.json()["details"] == []
    assert other.post("/search").status_code == 200               # another client, the same moment


def test_a_valid_api_key_is_not_limited_and_a_wrong_one_is_refused(limited_app):
    farm = TestClient(limited_app, client=("127.0.0.5", 5000))
    assert [farm.post("/search").status_code for _ in range(4)][-1] == 429
    assert {farm.post("/search", headers={"X-API-Key": KEY}).status_code for _ in range(10)} == {200}
    assert farm.post("/search", headers={"X-API-Key": "esr_wrong"}).status_code == 401


def test_writes_into_one_session_are_limited_whoever_sends_them(limited_app):
    answers = [TestClient(limited_app, client=(f"127.0.0.{n}", 5000)).post("/sessions/s1.x/events")
               for n in range(10, 13)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert "per session (serve.rate_limits.session_writes)" in answers[-1].json()["error"]
    other_session = TestClient(limited_app, client=("127.0.0.12", 5000)).post("/sessions/s1.y/events")
    assert other_session.status_code == 200


def test_the_public_routes_are_charged_to_their_limits():
    from es_ray.serve.routes import items, search, sessions

    def charged(module, path: str, method: str) -> set:
        route = next(r for r in module.router.routes if r.path == path and method in r.methods)
        return {d.call for d in route.dependant.dependencies}

    assert rate_limits.search in charged(search, "/v1/search", "POST")
    for path in ("/v1/sessions/{session_id}/events", "/v1/sessions/{session_id}/irrelevant"):
        assert {rate_limits.clickstream, rate_limits.session_writes} <= charged(sessions, path, "POST")
    assert rate_limits.session_reads in charged(sessions, "/v1/sessions/{session_id}", "GET")
    assert not {rate_limits.search, rate_limits.clickstream} & charged(items, "/v1/items", "PUT")  # keyed only


# --- the client: its source address, Retry-After -----------------------------------------------------

class _EchoPeer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_client_sends_from_its_local_address():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoPeer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        for address in ("127.0.0.5", person_address(USERS, 700)):
            with EsRayClient(url, local_address=address) as person:
                assert person.http.get("/").text == address
                with person.as_user("u1.token") as same_person:
                    assert same_person.http.get("/").text == address
    finally:
        server.shutdown()
        server.server_close()


def test_an_error_carries_retry_after():
    limited = httpx.Response(429, headers={"Retry-After": "17"}, json={"error": "rate limit exceeded"})
    assert EsRayError.of(limited).retry_after == 17 and EsRayError.of(limited).status == 429
    assert EsRayError.of(httpx.Response(404, json={"error": "no such item"})).retry_after is None


def test_simulated_people_have_distinct_loopback_addresses():
    crowds = [{person_address(crowd, n) for n in range(3000)} for crowd in (USERS, TRAFFIC, MEASUREMENT)]
    assert all(len(c) == 3000 for c in crowds) and not (crowds[0] & crowds[1] or crowds[1] & crowds[2])
    every = set().union(*crowds)
    assert all(a.startswith("127.") and not a.startswith("127.0.") and a.split(".")[3] not in ("0", "255")
               for a in every)


# --- on the stack ------------------------------------------------------------------------------------

def test_a_farm_over_the_clickstream_limit_gets_429_while_others_and_keys_are_served(stack, settings, client,
                                                                                    probe_items):
    """Against the stack's own limits (the test stack runs the defaults): one anonymous address sends
    clicks just past serve.rate_limits.clickstream; another address at the same moment searches and
    clicks, and the operator's key from the farm's own address is not limited."""
    limit = parse(settings.serve.rate_limits.clickstream).amount
    click = schemas.EventsRequest(events=[schemas.Event(event_id="e-1", item_id="anything", type="click")])
    statuses = []
    with EsRayClient(stack.serve_url, local_address="127.9.0.1") as farm:
        # Ids no search returned: each refused with 403 without a database query, but each counted.
        # Each replica counts on its own, so up to replicas x limit requests may pass.
        for n in range(settings.serve.replicas * limit + 1):
            answer = farm.send("POST", f"/v1/sessions/fake-{n}/events", click)
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                break
        assert statuses[:limit] == [403] * limit and statuses[-1] == 429, statuses
        assert 1 <= int(answer.headers["Retry-After"]) <= 60
        assert "serve.rate_limits.clickstream" in answer.json()["error"]
        with pytest.raises(EsRayError) as refused:
            farm.add_events("fake-again", [{"event_id": "e-2", "item_id": "anything", "type": "click"}])
        assert refused.value.status == 429 and refused.value.retry_after >= 1

    with EsRayClient(stack.serve_url, local_address="127.9.0.2") as person:
        found = person.search("probe", limit=3)
        assert found.session_id and found.results
        assert person.click(found.session_id, found.results[0].id).accepted == 1
    assert client.session(found.session_id).client == "127.9.0.2"   # the replica sees the bound address

    with EsRayClient.for_stack(stack, local_address="127.9.0.1") as operator:
        keyed = operator.send("POST", "/v1/sessions/fake-keyed/events", click)
        assert keyed.status_code == 404, keyed.text               # served (an unknown session), not 429
