"""Authentication: API keys on every admin and write route, user tokens for a user's own data.

The route walk reads the live OpenAPI document, so a route added later without a key check fails here.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from fastapi import HTTPException

from es_ray.config import ApiKeyEntry, AuthSettings
from es_ray.serve import auth

# After the plain tests: the probe items these tests add and delete would sit in (and leave tombstones
# in) the collection the search tests rank and page through.
pytestmark = pytest.mark.hostile

MUTATING = {"post", "put", "patch", "delete"}
# Public by configuration (auth.public_search / auth.public_clickstream, both true in the test stack):
# anyone may search and send clicks (to sessions search returned: tests/test_provenance.py). Every other
# mutating route needs a key, recording a session shown elsewhere (POST /v1/sessions) included.
PUBLIC_BY_CONFIG = {("post", "/v1/search"), ("post", "/v1/sessions/{session_id}/events"),
                    ("post", "/v1/sessions/{session_id}/irrelevant")}
ADMIN_VIEWS = {("get", "/v1/tasks"), ("get", "/v1/tasks/{task_id}"), ("get", "/v1/lifecycle"),
               ("get", "/v1/sessions/{session_id}")}


def _routes(anon) -> dict[tuple[str, str], dict]:
    spec = anon.get("/openapi.json")
    assert spec.status_code == 200, spec.text
    return {(method, path): operation for path, operations in spec.json()["paths"].items()
            for method, operation in operations.items()}


def _call(client, method: str, path: str, headers: dict | None = None, body: dict | None = None):
    concrete = re.sub(r"\{[^}]+\}", "probe-1", path)
    return client.request(method.upper(), concrete, json=body if body is not None else {}, headers=headers or {})


def test_every_mutating_route_and_admin_view_refuses_a_request_without_a_valid_key(anon, api):
    routes = _routes(anon)
    mutating = {(m, p) for m, p in routes if m in MUTATING}
    assert PUBLIC_BY_CONFIG <= mutating, "the public routes this test knows are not in the OpenAPI document"
    guarded = sorted((mutating - PUBLIC_BY_CONFIG) | ADMIN_VIEWS)
    assert len(guarded) >= 12, guarded
    for method, path in guarded:
        for headers in ({}, {"X-API-Key": "esr_not-a-key"}, {"X-API-Key": ""},
                        {"X-User-Token": "u1.bm9ib2R5.9999999999.x"}):
            response = _call(anon, method, path, headers)
            assert response.status_code == 401, (method, path, headers, response.status_code, response.text)
            assert response.json()["error"], response.text
            assert response.headers.get("www-authenticate") == "X-API-Key"
    # With the key a request gets past authentication to validation: a body with an unknown field is a
    # 422 (routes without a body are left out: with a key they would really run).
    with_body = [(m, p) for m, p in guarded if "requestBody" in routes[(m, p)]]
    assert len(with_body) >= 7, with_body
    for method, path in with_body:
        response = _call(api, method, path, body={"not_a_field": 1})
        assert response.status_code == 422, (method, path, response.status_code, response.text)


def test_public_routes_refuse_a_wrong_key_instead_of_ignoring_it(anon):
    response = anon.post("/v1/search", json={"query": "x"}, headers={"X-API-Key": "esr_wrong"})
    assert response.status_code == 401, response.text
    assert "invalid API key" in response.json()["error"]


def test_user_tokens_guard_a_users_sessions_and_personalisation(anon, api, probe_items):
    alice = api.post("/v1/users/alice/token", json={}).json()
    bob = api.post("/v1/users/bob/token", json={"ttl_s": 60}).json()
    assert alice["user_id"] == "alice" and alice["expires_at"] > time.time() + 3600
    as_alice, as_bob = {"X-User-Token": alice["token"]}, {"X-User-Token": bob["token"]}
    query = {"query": "cells and disease", "limit": 3, "user_id": "alice"}

    # Personalised search: only alice (or a key) may search as alice.
    assert anon.post("/v1/search", json=query).status_code == 401
    assert anon.post("/v1/search", json=query, headers=as_bob).status_code == 403
    searched = anon.post("/v1/search", json=query, headers=as_alice)
    assert searched.status_code == 200, searched.text
    session_id = searched.json()["session_id"]
    shown = searched.json()["results"][0]["id"]

    # Her session: readable with her token or a key, by no one else; clicks on it only from her.
    assert anon.get(f"/v1/sessions/{session_id}").status_code == 401
    assert anon.get(f"/v1/sessions/{session_id}", headers=as_bob).status_code == 403
    assert anon.get(f"/v1/sessions/{session_id}", headers=as_alice).json()["user_id"] == "alice"
    assert api.get(f"/v1/sessions/{session_id}").status_code == 200
    click = {"events": [{"event_id": f"auth-{session_id}", "item_id": shown, "type": "click"}]}
    assert anon.post(f"/v1/sessions/{session_id}/events", json=click).status_code == 401
    assert anon.post(f"/v1/sessions/{session_id}/events", json=click, headers=as_bob).status_code == 403
    assert anon.post(f"/v1/sessions/{session_id}/events", json=click, headers=as_alice).json()["accepted"] == 1
    events = api.get(f"/v1/sessions/{session_id}").json()["events"]
    assert [e["event_id"] for e in events] == [f"auth-{session_id}"]  # the refused ones stored nothing

    # A session shown by another system needs an API key, whoever it is for: a user token is not one.
    shown_list = {"query": "q", "results": [{"id": shown, "rank": 1}]}
    assert anon.post("/v1/sessions", json={**shown_list, "user_id": "alice"}, headers=as_alice).status_code == 401
    assert anon.post("/v1/sessions", json=shown_list).status_code == 401
    assert api.post("/v1/sessions", json={**shown_list, "user_id": "alice"}).status_code == 200

    # Forgetting: her own, not someone else's.
    assert anon.delete("/v1/users/alice/personalisation", headers=as_bob).status_code == 403
    forgot = anon.delete("/v1/users/alice/personalisation", headers=as_alice)
    assert forgot.status_code == 200 and forgot.json()["user_id"] == "alice", forgot.text

    # A user token is not an API key, and a token altered by one character is refused.
    assert anon.post("/v1/users/alice/token", json={}, headers=as_alice).status_code == 401
    tampered = alice["token"][:-1] + ("A" if alice["token"][-1] != "A" else "B")
    assert anon.get(f"/v1/sessions/{session_id}", headers={"X-User-Token": tampered}).status_code == 401


# --- the pieces, without a stack -------------------------------------------------------------------------

@pytest.fixture
def configured():
    key = auth.new_api_key()
    settings = AuthSettings(api_keys=[ApiKeyEntry(name="ops", sha256=auth.hash_key(key)),
                                      ApiKeyEntry(name="ci", sha256=auth.hash_key("another"))],
                            user_token_secret="s" * 40, public_search=False, public_clickstream=False)
    auth.configure(settings)
    yield key
    auth._authenticator = None


def test_keys_are_checked_by_hash(configured):
    checker = auth.authenticator()
    assert checker.key_name(configured) == "ops"
    assert checker.key_name("another") == "ci"
    assert checker.key_name(configured[:-1]) is None
    assert checker.key_name("") is None
    assert configured not in repr(checker.settings)  # only the hash is held


def test_tokens_expire_and_bind_one_user(configured):
    checker = auth.authenticator()
    token, expires = checker.issue_token("alice", ttl_s=60)
    assert checker.token_user(token) == "alice" and expires > time.time()
    old, _ = checker.issue_token("alice", ttl_s=1e-6)
    time.sleep(0.01)
    assert checker.token_user(old) is None
    prefix, user, when, signature = token.split(".")
    forged = ".".join([prefix, auth._b64(b"bob"), when, signature])
    assert checker.token_user(forged) is None
    other = auth.Authenticator(AuthSettings(user_token_secret="t" * 40))
    assert other.token_user(token) is None  # rotating the secret revokes every token


def test_keyed_search_and_clickstream_when_configured(configured):
    with pytest.raises(HTTPException) as refused:
        asyncio.run(auth.searcher(auth.Caller()))
    assert refused.value.status_code == 401
    with pytest.raises(HTTPException):
        asyncio.run(auth.clickstream_writer(auth.Caller()))
    assert asyncio.run(auth.searcher(auth.Caller(user_id="alice"))).user_id == "alice"
    assert asyncio.run(auth.clickstream_writer(auth.Caller(admin=True, key_name="ops"))).admin
    with pytest.raises(HTTPException) as wrong_key:
        asyncio.run(auth.caller(key="esr_wrong", token=None))
    assert wrong_key.value.status_code == 401
