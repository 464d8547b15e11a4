"""The Python client (es_ray/client.py) against the real stack: every method once, the server's error
messages in EsRayError, requests refused before the network, user tokens."""

from __future__ import annotations

import uuid

import httpx
import pytest
from pydantic import ValidationError

from es_ray.client import EsRayClient, EsRayError
from es_ray.serve import schemas

ONLY = {"group": "client-test"}
ITEMS = [{"id": f"client-{n}", "text": text, "payload": {**ONLY, "n": n}} for n, text in enumerate([
    "Glaciers retreat as summers grow warmer", "Sea ice thins over the Arctic winter",
    "Permafrost thaw releases methane", "Snowfall records in mountain ranges",
    "Icebergs calving from the ice shelf", "Meltwater lakes on the Greenland ice sheet"])]

# Every route of the API and the client method that calls it: a route added without a method fails below.
ROUTES = {("get", "/healthz"): "health", ("post", "/v1/search"): "search", ("put", "/v1/items"): "upsert_items",
          ("delete", "/v1/items"): "delete_items", ("post", "/v1/sessions"): "create_session",
          ("get", "/v1/sessions/{session_id}"): "session", ("post", "/v1/sessions/{session_id}/events"): "add_events",
          ("post", "/v1/sessions/{session_id}/irrelevant"): "mark_irrelevant",
          ("post", "/v1/improvement/run"): "run_improvement", ("post", "/v1/improvement/undo"): "undo_improvement",
          ("delete", "/v1/users/{user_id}/personalisation"): "forget_user",
          ("post", "/v1/users/{user_id}/token"): "issue_user_token",
          ("post", "/v1/tasks/fine-tune"): "start_fine_tune", ("post", "/v1/tasks/reindex"): "start_reindex",
          ("get", "/v1/tasks/{task_id}"): "task", ("get", "/v1/tasks"): "tasks",
          ("get", "/v1/lifecycle"): "lifecycle", ("post", "/v1/lifecycle/switch"): "switch",
          ("post", "/v1/lifecycle/rollback"): "rollback", ("post", "/v1/lifecycle/cleanup"): "cleanup",
          ("post", "/v1/lifecycle/abandon-green"): "abandon_green"}


@pytest.fixture(scope="module")
def items(client):
    answer = client.upsert_items(ITEMS)
    assert answer == schemas.UpsertResponse(upserted=len(ITEMS), failed=[])
    yield
    client.delete_items(item["id"] for item in ITEMS)


def test_credentials_go_in_the_headers_serve_auth_reads():
    with EsRayClient("http://127.0.0.1:9/", api_key="esr_key") as admin, admin.as_user("u1.token") as user:
        assert admin.http.headers["X-API-Key"] == "esr_key" and "X-User-Token" not in admin.http.headers
        assert user.http.headers["X-User-Token"] == "u1.token" and "X-API-Key" not in user.http.headers
        assert str(user.http.base_url) == "http://127.0.0.1:9"


def test_an_invalid_request_is_refused_before_anything_is_sent():
    with EsRayClient("http://127.0.0.1:9") as nowhere:  # port 9 (discard): nothing answers there
        with pytest.raises(ValidationError, match="filter"):
            nowhere.search("glaciers", filter={"year": {"after": 2000}})
        with pytest.raises(ValidationError, match="type"):
            nowhere.add_events("s", [{"event_id": "e", "item_id": "i", "type": "hover"}])
        with pytest.raises(httpx.ConnectError):    # a valid one does try the network
            nowhere.search("glaciers")


def test_every_route_has_a_client_method(anon):
    spec = anon.get("/openapi.json").json()
    routes = {(method, path) for path, operations in spec["paths"].items() for method in operations}
    assert routes == set(ROUTES)
    assert all(callable(getattr(EsRayClient, name)) for name in ROUTES.values())


def test_health(client):
    report = client.health()
    assert report["healthy"] is True and report["triton"] == "ok", report


def test_search_click_and_session(client, items):
    found = client.search("melting ice in the arctic", limit=4, filter=ONLY)
    assert isinstance(found, schemas.SearchResponse) and found.model.startswith("v") and found.session_id
    shown = [r.id for r in found.results]
    assert len(shown) == 4 and set(shown) <= {item["id"] for item in ITEMS}
    assert client.search("melting ice", limit=2, offset=1, filter=ONLY, session=False).session_id is None

    assert client.click(found.session_id, shown[1]) == schemas.EventsResponse(accepted=1, duplicates=0)
    first = client.add_events(found.session_id, [{"event_id": "client-e1", "item_id": shown[0], "type": "click"}])
    assert first.accepted == 1
    again = client.add_events(found.session_id, [schemas.Event(event_id="client-e1", item_id=shown[0], type="click")])
    assert again == schemas.EventsResponse(accepted=0, duplicates=1)

    session = client.session(found.session_id)
    assert isinstance(session, schemas.SessionOut) and session.query == "melting ice in the arctic"
    assert [r.id for r in session.results] == shown and [r.rank for r in session.results] == [1, 2, 3, 4]
    assert sorted(e.item_id for e in session.events) == sorted(shown[:2])
    assert client.mark_irrelevant(found.session_id) == {"session_id": found.session_id, "irrelevant": True}
    assert client.session(found.session_id).irrelevant is True


def test_sessions_shown_elsewhere(client, stack):
    named = f"client-session-{uuid.uuid4().hex[:8]}"
    created = client.create_session("shown by another app", ["x1", "x2", "x3"], first_rank=11, session_id=named)
    assert created == schemas.SessionCreated(session_id=named, created=True)
    assert client.create_session("shown by another app", ["x1", "x2", "x3"], first_rank=11,
                                 session_id=named).created is False
    recorded = client.session(named)
    assert [(r.rank, r.id) for r in recorded.results] == [(11, "x1"), (12, "x2"), (13, "x3")]
    assert (recorded.source, recorded.key_name, recorded.client) == ("ingested", "local-admin", "127.0.0.1")
    with pytest.raises(EsRayError) as conflict:
        client.create_session("another query", ["x1"], session_id=named)
    assert conflict.value.status == 409 and named in conflict.value.detail
    with EsRayClient.for_stack(stack, anonymous=True) as anyone, pytest.raises(EsRayError) as refused:
        anyone.create_session("made up", ["x1"])     # anyone could make these up: a key is needed
    assert refused.value.status == 401 and "needs an API key" in refused.value.detail


def test_upsert_and_delete(client):
    item = {"id": f"client-gone-{uuid.uuid4().hex[:6]}", "text": "A short-lived note about tides"}
    assert client.upsert_items([schemas.Item(**item)]).upserted == 1
    assert item["id"] in [r.id for r in client.search("tides", limit=20, session=False).results]
    assert client.delete_items([item["id"]]) == schemas.DeleteResponse(deleted=1)
    assert item["id"] not in [r.id for r in client.search("tides", limit=20, session=False).results]


def test_improvement_run_and_undo(client, items):
    found = client.search("icebergs and ice shelves", limit=5, filter=ONLY)
    client.click(found.session_id, found.results[-1].id)
    learned = client.run_improvement(settle_s=0)
    assert learned["sessions"] >= 1, learned
    undone = client.undo_improvement()
    assert {"restored_vectors", "evidence_cells"} <= set(undone), undone


def test_errors_carry_the_servers_message(client, stack, items):
    found = client.search("glaciers", limit=2, filter=ONLY)
    not_shown = next(item["id"] for item in ITEMS if item["id"] not in [r.id for r in found.results])
    with pytest.raises(EsRayError) as rejected:          # the model accepts it; only the server knows
        client.click(found.session_id, not_shown)
    assert rejected.value.status == 422 and not_shown in rejected.value.detail
    assert rejected.value.response.json()["error"] == rejected.value.detail

    with pytest.raises(EsRayError) as missing:
        client.click("no-such-session", "client-0")
    assert missing.value.status == 404 and "no-such-session" in missing.value.detail

    with pytest.raises(EsRayError) as invalid:           # checked by the route, so the server says it
        client.run_improvement(settle_s=-1)
    assert invalid.value.status == 422 and "settle_s must be 0 to 86400" in invalid.value.detail
    assert invalid.value.details and invalid.value.details[0]["field"] == "query.settle_s"

    with EsRayClient.for_stack(stack, anonymous=True) as anyone:
        assert anyone.search("glaciers", limit=1, session=False).results  # search is public in the test stack
        with pytest.raises(EsRayError) as no_key:
            anyone.lifecycle()
    assert no_key.value.status == 401 and "needs an API key in the X-API-Key header" in no_key.value.detail
    with EsRayClient(stack.serve_url, api_key="esr_not-a-key") as wrong, pytest.raises(EsRayError) as bad_key:
        wrong.tasks()
    assert bad_key.value.status == 401 and "invalid API key" in bad_key.value.detail


def test_bad_requests_fail_before_the_network(client):
    with pytest.raises(ValidationError, match="unknown operator 'bogus'"):
        client.search("glaciers", filter={"group": {"bogus": 1}})
    # ...with the message the server would give for the same body
    answer = client.http.post("/v1/search", json={"query": "glaciers", "filter": {"group": {"bogus": 1}}})
    assert answer.status_code == 422 and "unknown operator 'bogus'" in answer.json()["error"]
    with pytest.raises(ValidationError, match="limit must be between 1 and"):
        client.search("glaciers", limit=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        client.upsert_items([{"id": "a", "text": "b", "paylod": {}}])
    with pytest.raises(ValidationError, match="invalid fine-tune config"):
        client.start_fine_tune({"tune": {"num_sample": 2}})
    with pytest.raises(ValueError, match="unknown task kind"):
        client.tasks("finetune")
    with pytest.raises(TypeError):
        client.search("glaciers", limt=3)  # a misspelt option is not silently dropped


def test_user_tokens(client, stack, items):
    ann_token = client.issue_user_token("client-ann", ttl_s=600)
    assert isinstance(ann_token, schemas.UserToken) and ann_token.user_id == "client-ann"
    ben_token = client.issue_user_token("client-ben")
    with client.as_user(ann_token) as ann, client.as_user(ben_token.token) as ben:
        assert ann.api_key is None and ann.user_token == ann_token.token
        mine = ann.search("sea ice", limit=3, filter=ONLY, user_id="client-ann")
        assert ann.session(mine.session_id).user_id == "client-ann"
        assert ann.click(mine.session_id, mine.results[-1].id).accepted == 1

        with pytest.raises(EsRayError) as other:
            ben.session(mine.session_id)
        assert other.value.status == 403 and "belongs to another user" in other.value.detail
        with pytest.raises(EsRayError) as posing:
            ben.search("sea ice", user_id="client-ann")
        assert posing.value.status == 403
        with pytest.raises(EsRayError) as admin_only:
            ann.lifecycle()
        assert admin_only.value.status == 401

        client.run_improvement(settle_s=0)   # ann's click becomes her personal vectors
        forgotten = ann.forget_user("client-ann")
        assert forgotten["user_id"] == "client-ann" and forgotten["deleted_vectors"] >= 1, forgotten
        with pytest.raises(EsRayError) as not_hers:
            ann.forget_user("client-ben")
        assert not_hers.value.status == 403
    with client.as_user("u1.bm9ib2R5.9999999999.x") as forged, pytest.raises(EsRayError) as invalid:
        forged.session(mine.session_id)
    assert invalid.value.status == 401 and "invalid or expired user token" in invalid.value.detail


def test_tasks_and_lifecycle(client):
    state = client.lifecycle()
    blue = state["blue"]["model_version"]
    assert state["green"] is None and state["previous"] is None, "this test runs before the lifecycle tests"

    with pytest.raises(EsRayError) as unknown:
        client.start_reindex(99_999, switch="never")
    assert unknown.value.status == 404 and "model version 99999 is not registered" in unknown.value.detail
    with pytest.raises(EsRayError) as same:
        client.start_reindex(blue)
    assert same.value.status == 409 and "already blue" in same.value.detail
    with pytest.raises(EsRayError) as no_green:
        client.switch()
    assert no_green.value.status == 409 and "no green collection" in no_green.value.detail
    with pytest.raises(EsRayError) as no_previous:
        client.rollback()
    assert no_previous.value.status == 409 and "nothing to roll back to" in no_previous.value.detail
    assert client.cleanup()["dropped"] is None

    # A fine-tune that cannot find enough examples: a real task and Ray job that ends failed, quickly.
    started = client.start_fine_tune({"data": {"min_train_examples": 1_000_000}})
    assert isinstance(started, schemas.TaskOut) and started.kind == "fine-tune"
    seen = []
    ended = client.wait_for_task(started.task_id, timeout_s=600, poll_s=2, on_update=seen.append)
    assert ended.status == "failed" and "data.min_train_examples" in ended.error, ended
    assert seen and seen[-1] == ended and client.task(started.task_id) == ended
    listed = client.tasks("fine-tune", limit=5)
    assert listed[0].task_id == started.task_id and all(t.kind == "fine-tune" for t in listed)
    assert started.task_id in [t.task_id for t in client.tasks()]
    with pytest.raises(EsRayError) as missing:
        client.task("no-such-task")
    assert missing.value.status == 404
    with pytest.raises(EsRayError) as too_many:
        client.tasks(limit=500)
    assert too_many.value.status == 422 and "limit must be 1 to 200" in too_many.value.detail


def test_the_raw_exchange_stays_reachable(client):
    """For callers that time requests or count statuses: `send` answers raw and never raises."""
    response = client.send("POST", "/v1/search", client.search_request("glaciers", limit=1, session=False))
    assert response.status_code == 200 and response.json()["results"]
    refused = client.send("GET", "/v1/tasks", params={"limit": 0})
    assert refused.status_code == 422 and refused.json()["error"]
