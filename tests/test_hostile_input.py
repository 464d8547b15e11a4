"""Hostile input: injection strings, NUL bytes, broken unicode, huge strings and bodies.

Every one either is stored and matched as the literal it is, or is refused with a 4xx that says why;
none reaches the database as anything but a parameter, and none is a 5xx.
"""

from __future__ import annotations

import json

import pytest

INJECTIONS = [
    "'; DROP TABLE sessions; --",
    "\" OR 1=1 --",
    "1) OR (1=1",
    "$.payload[?(@.tag == 'x')]",
    "payload #> '{a}'",
    "{\"$ne\": null}",
    "%00%27",
    "\\u0000 escaped, not a NUL",
    "<script>alert(1)</script>",
    "\u202eevil right-to-left\u202c",
    "e\u0301 combining, ﷽ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 😀",
    "../../etc/passwd",
]


def _blue_items(api) -> int:
    return api.get("/v1/lifecycle").json()["blue"]["items"]


def test_injection_strings_are_stored_and_matched_literally(api, anon):
    before = _blue_items(api)
    items = [{"id": f"hostile-{n}-{text}", "text": f"{text} about enzymes", "payload": {"tag": text, "n": n}}
             for n, text in enumerate(INJECTIONS)]
    response = api.put("/v1/items", json={"items": items})
    assert response.status_code == 200, response.text
    assert response.json() == {"upserted": len(items), "failed": []}
    assert _blue_items(api) == before + len(items)

    for item in items:
        # As a filter value: exactly the item holding that literal.
        hits = anon.post("/v1/search", json={"query": item["text"], "limit": 10, "session": False,
                                             "filter": {"tag": item["payload"]["tag"]}})
        assert hits.status_code == 200, hits.text
        assert [h["id"] for h in hits.json()["results"]] == [item["id"]]
        assert hits.json()["results"][0]["payload"] == item["payload"]
        # As a query and a user id (the session is stored with them as text).
        searched = api.post("/v1/search", json={"query": item["payload"]["tag"], "limit": 3,
                                                "user_id": item["payload"]["tag"]})
        assert searched.status_code == 200, searched.text
        session = api.get(f"/v1/sessions/{searched.json()['session_id']}").json()
        assert (session["query"], session["user_id"]) == (item["payload"]["tag"], item["payload"]["tag"])

    # Filter keys are field names, never SQL or JSON path: refused with the reason.
    for key in ("tag'; DROP TABLE items; --", "$.tag", "tag #> '{a}'", "a..b"):
        refused = anon.post("/v1/search", json={"query": "x", "filter": {key: 1}})
        assert refused.status_code == 422, (key, refused.text)
        assert "is not a field name" in refused.json()["error"]

    deleted = api.request("DELETE", "/v1/items", json={"ids": [i["id"] for i in items]})
    assert deleted.json() == {"deleted": len(items)}
    assert _blue_items(api) == before  # nothing else was touched


@pytest.mark.parametrize("where, body", [
    ("id", {"items": [{"id": "a\x00b", "text": "t"}]}),
    ("text", {"items": [{"id": "nul-text", "text": "before\x00after"}]}),
    ("payload", {"items": [{"id": "nul-payload", "text": "t", "payload": {"k": "v\x00"}}]}),
    ("payload key", {"items": [{"id": "nul-key", "text": "t", "payload": {"k\x00": 1}}]}),
])
def test_nul_bytes_in_items_are_refused_and_nothing_is_stored(api, where, body):
    before = _blue_items(api)
    response = api.put("/v1/items", json=body)
    assert response.status_code == 422, response.text
    assert "NUL" in response.json()["error"], response.text
    assert _blue_items(api) == before


@pytest.mark.parametrize("body, message", [
    ({"query": "a\x00b"}, "NUL"),
    ({"query": "x", "user_id": "u\x00"}, "NUL"),
    ({"query": "x", "filter": {"tag": "v\x00"}}, "NUL"),
    ({"query": "x" * 100_000}, "characters long; the limit is"),   # 1 MB: a 413 (test_bodies_over_the_size_limit)
    ({"query": "x", "filter": {"tag": {"in": ["x" * 100] * 1001}}},
         "at most 1000 (limit serve.filter_limits.max_in_values)"),
])
def test_hostile_searches_are_refused_with_the_reason(anon, body, message):
    response = anon.post("/v1/search", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]


def test_broken_unicode_nan_and_deep_nesting_are_refused(api, anon):
    # JSON may carry a lone surrogate and (for Python's parser) NaN; neither can be stored.
    raw = {"lone surrogate": '{"items": [{"id": "s", "text": "broken \\ud800 text"}]}',
           "NaN": '{"items": [{"id": "n", "text": "t", "payload": {"x": NaN}}]}',
           "Infinity": '{"items": [{"id": "n", "text": "t", "payload": {"x": [1, Infinity]}}]}'}
    for what, body in raw.items():
        response = api.put("/v1/items", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, (what, response.text)
        error = response.json()["error"]
        assert "not valid unicode" in error or "finite" in error, response.text
    deep: dict = {"leaf": 1}
    for _ in range(40):
        deep = {"d": deep}
    response = api.put("/v1/items", json={"items": [{"id": "deep", "text": "t", "payload": deep}]})
    assert response.status_code == 422 and "nested deeper" in response.json()["error"], response.text
    nested = anon.post("/v1/search", content="[" * 200_000, headers={"content-type": "application/json"})
    assert 400 <= nested.status_code < 500, nested.text


@pytest.mark.parametrize("path", ["/v1/sessions/a%00b", "/v1/sessions/" + "x" * 600])
def test_hostile_path_ids_are_refused(api, path):
    response = api.get(path)
    assert response.status_code == 422, response.text


def test_huge_ids_and_texts_are_refused(api, settings):
    megabyte = "x" * 1_048_576
    for item in ({"id": megabyte, "text": "t"}, {"id": "big-text", "text": megabyte}):
        response = api.put("/v1/items", json={"items": [item]})
        assert response.status_code == 422, response.text
        assert "characters long; the limit is" in response.json()["error"]


def test_bodies_over_the_size_limit_get_a_clear_413(api, anon, settings):
    search_limit = settings.serve.max_search_body_bytes   # the public search's own, smaller limit
    response = anon.post("/v1/search", content=json.dumps({"query": "x", "pad": "y" * search_limit}).encode(),
                         headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert f"the limit is {search_limit} (serve.max_search_body_bytes)" in response.json()["error"]
    limit = settings.serve.max_body_bytes
    body = json.dumps({"query": "x", "pad": "y" * (limit + 10)}).encode()
    response = api.put("/v1/items", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert f"the limit is {limit} (serve.max_body_bytes)" in response.json()["error"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for start in range(0, len(body), 1 << 20):
            yield body[start:start + (1 << 20)]

    response = api.put("/v1/items", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert "serve.max_body_bytes" in response.json()["error"]
    # The service is unharmed.
    assert anon.post("/v1/search", json={"query": "enzymes", "limit": 1, "session": False}).status_code == 200
