"""Bad input answers 4xx with a message naming the problem, stores nothing, and the stack keeps serving."""

import pytest

from tests.helpers import search

LONG_ID = "x" * 10_000


@pytest.mark.parametrize("method, path, body, status, fragment", [
    ("POST", "/v1/search", b'{"query": "abc", ', 422, "not valid JSON"),
    ("POST", "/v1/search", b"", 422, "body"),
    ("POST", "/v1/search", {}, 422, "query: Field required"),
    ("POST", "/v1/search", {"query": 42}, 422, "query: Input should be a valid string"),
    ("POST", "/v1/search", {"query": "   "}, 422, "query must not be empty"),
    ("POST", "/v1/search", {"query": "x", "limit": 0}, 422, "limit must be between 1 and"),
    ("POST", "/v1/search", {"query": "x", "limit": 1000}, 422, "limit must be between 1 and"),
    ("POST", "/v1/search", {"query": "x", "limit": "10"}, 422, "limit: Input should be a valid integer"),
    ("POST", "/v1/search", {"query": "x", "offset": -1}, 422, "offset must be between 0 and"),
    ("POST", "/v1/search", {"query": "x", "filter": {"year": {"near": 3}}}, 422, "unknown operator 'near'"),
    ("POST", "/v1/search", {"query": "x", "filter": {"a;drop": 1}}, 422, "not a field name"),
    ("POST", "/v1/search", {"query": "x", "filter": [1]}, 422, "filter: Input should be a valid dictionary"),
    ("POST", "/v1/search", {"query": "x", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ("POST", "/v1/search", {"query": "x", "mode": "fuzzy"}, 422, "mode: Input should be 'dense', 'lexical' or 'hybrid'"),
    ("PUT", "/v1/items", {}, 422, "items: Field required"),
    ("PUT", "/v1/items", {"items": []}, 422, "items: List should have at least 1 item"),
    ("PUT", "/v1/items", {"items": [{"id": "a"}]}, 422, "items.0.text: Field required"),
    ("PUT", "/v1/items", {"items": [{"id": 5, "text": "t"}]}, 422, "items.0.id: Input should be a valid string"),
    ("PUT", "/v1/items", {"items": [{"id": LONG_ID, "text": "t"}]}, 422, "id is 10000 characters long"),
    ("PUT", "/v1/items", {"items": [{"id": "", "text": "t"}]}, 422, "id must not be empty"),
    ("PUT", "/v1/items", {"items": [{"id": "a", "text": ""}]}, 422, "text must not be empty"),
    ("PUT", "/v1/items", {"items": [{"id": "a", "text": "t", "payload": [1, 2]}]}, 422,
     "items.0.payload: Input should be a valid dictionary"),
    ("PUT", "/v1/items", {"items": [{"id": "a", "text": "t", "payload": "s"}]}, 422,
     "items.0.payload: Input should be a valid dictionary"),
    ("PUT", "/v1/items", {"items": [{"id": "a\u0000b", "text": "t"}]}, 422, "NUL"),
    ("DELETE", "/v1/items", {"ids": []}, 422, "ids: List should have at least 1 item"),
    ("DELETE", "/v1/items", {"ids": [LONG_ID]}, 422, "id is 10000 characters long"),
    ("DELETE", "/v1/items", {"id": "a"}, 422, "ids: Field required"),
    ("POST", "/v1/lifecycle/abandon-green", {"collection": "c; drop"}, 422, "collection: String should match pattern"),
    ("POST", "/v1/lifecycle/abandon-green", {"green": "c2"}, 422, "green: Extra inputs are not permitted"),
])
def test_bad_request_is_a_clear_4xx(api, method, path, body, status, fragment):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = api.request(method, path, **kwargs)
    assert response.status_code == status, response.text
    payload = response.json()
    assert fragment in payload["error"], payload
    assert payload["details"], payload


def test_too_many_items_in_one_request(api, settings):
    items = [{"id": f"many-{i}", "text": "t"} for i in range(settings.serve.max_items_per_request + 1)]
    response = api.put("/v1/items", json={"items": items})
    assert response.status_code == 422
    assert "the limit is" in response.json()["error"]


def test_bad_requests_store_nothing_and_the_stack_keeps_serving(api):
    api.put("/v1/items", json={"items": [{"id": "ok-1", "text": "fine"}, {"id": LONG_ID, "text": "t"}]})
    assert "ok-1" not in [r["id"] for r in search(api, "fine", limit=100)["results"]]
    assert api.get("/healthz").status_code == 200
    assert search(api, "anything at all", limit=3)["model"] == "v1"


def test_unknown_route_and_method(api):
    assert api.get("/v1/nothing-here").status_code == 404
    assert api.get("/v1/search").status_code == 405
