"""Clickstream on the real stack: sessions from searches and from clients, idempotent events, irrelevant marks."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import ids, search

ITEMS = [{"id": f"cs-{i}", "text": f"Clickstream test document {i} about volcanoes and lava flows",
          "payload": {"i": i}} for i in range(12)]


@pytest.fixture(scope="module")
def items(api):
    assert api.put("/v1/items", json={"items": ITEMS}).json()["upserted"] == len(ITEMS)
    yield
    api.request("DELETE", "/v1/items", json={"ids": [i["id"] for i in ITEMS]})


def session_of(api, session_id):
    response = api.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


def test_search_records_the_shown_results_with_ranks(api, items):
    body = search(api, "volcano lava", limit=5, offset=3, user_id="alice",
                  filter={"i": {"exists": True}})
    session = session_of(api, body["session_id"])
    assert session["user_id"] == "alice" and session["query"] == "volcano lava" and session["model_version"] == 1
    assert [r["id"] for r in session["results"]] == ids(body)
    assert [r["rank"] for r in session["results"]] == [4, 5, 6, 7, 8]
    assert session["events"] == [] and session["irrelevant"] is False


def test_search_without_session_records_nothing(api, items):
    assert search(api, "volcano lava", session=False)["session_id"] is None


def test_clicks_are_idempotent_by_event_id(api, items):
    body = search(api, "volcano lava", limit=5, filter={"i": {"exists": True}})
    sid, first, second = body["session_id"], ids(body)[0], ids(body)[1]
    events = [{"event_id": f"{sid}-e1", "item_id": first, "type": "click"},
              {"event_id": f"{sid}-e2", "item_id": second, "type": "click"}]
    assert api.post(f"/v1/sessions/{sid}/events", json={"events": events}).json() == {"accepted": 2, "duplicates": 0}
    assert api.post(f"/v1/sessions/{sid}/events", json={"events": events}).json() == {"accepted": 0, "duplicates": 2}
    stored = session_of(api, sid)["events"]
    assert sorted((e["event_id"], e["item_id"]) for e in stored) == [(f"{sid}-e1", first), (f"{sid}-e2", second)]


def test_concurrent_resends_are_counted_once(api, items):
    sid = search(api, "lava", limit=3, filter={"i": {"exists": True}})["session_id"]
    item = session_of(api, sid)["results"][0]["id"]
    events = {"events": [{"event_id": f"{sid}-c{k}", "item_id": item, "type": "click"} for k in range(5)]}
    with ThreadPoolExecutor(6) as pool:
        answers = [r.json() for r in pool.map(lambda _: api.post(f"/v1/sessions/{sid}/events", json=events),
                                              range(6))]
    assert sum(a.get("accepted", 0) for a in answers) == 5
    assert len(session_of(api, sid)["events"]) == 5


def test_bad_events_store_nothing_and_say_why(api, items):
    body = search(api, "volcano", limit=3, filter={"i": {"exists": True}})
    sid, shown = body["session_id"], ids(body)[0]
    not_shown = next(i["id"] for i in ITEMS if i["id"] not in ids(body))
    mixed = [{"event_id": f"{sid}-ok", "item_id": shown, "type": "click"},
             {"event_id": f"{sid}-bad", "item_id": not_shown, "type": "click"}]
    response = api.post(f"/v1/sessions/{sid}/events", json={"events": mixed})
    assert response.status_code == 422 and not_shown in response.json()["error"]
    assert session_of(api, sid)["events"] == []  # the valid event of that request was not kept either

    response = api.post("/v1/sessions/no-such-session/events", json={"events": mixed[:1]})
    assert response.status_code == 404 and "no-such-session" in response.json()["error"]
    response = api.post(f"/v1/sessions/{sid}/events",
                        json={"events": [{"event_id": "x", "item_id": shown, "type": "hover"}]})
    assert response.status_code == 422 and "events.0.type" in response.json()["error"]
    response = api.post(f"/v1/sessions/{sid}/events", json={"events": [{"item_id": shown, "type": "click"}]})
    assert response.status_code == 422 and "event_id: Field required" in response.json()["error"]
    twice = [{"event_id": "same", "item_id": shown, "type": "click"}] * 2
    response = api.post(f"/v1/sessions/{sid}/events", json={"events": twice})
    assert response.status_code == 422 and "twice" in response.json()["error"]

    assert api.post(f"/v1/sessions/{sid}/events", json={"events": mixed[:1]}).json()["accepted"] == 1
    changed = [{"event_id": f"{sid}-ok", "item_id": ids(body)[1], "type": "click"}]
    response = api.post(f"/v1/sessions/{sid}/events", json={"events": changed})
    assert response.status_code == 409 and "already recorded" in response.json()["error"]


def test_irrelevant_mark(api, items):
    sid = search(api, "volcano", limit=3)["session_id"]
    assert api.post(f"/v1/sessions/{sid}/irrelevant").json() == {"session_id": sid, "irrelevant": True}
    assert session_of(api, sid)["irrelevant"] is True
    assert api.post("/v1/sessions/nope/irrelevant").status_code == 404
    assert api.get("/v1/sessions/nope").status_code == 404


def test_sessions_made_elsewhere(api):
    body = {"user_id": "bob", "query": "external query", "results": [{"id": "x1", "rank": 1}, {"id": "x2", "rank": 2}]}
    created = api.post("/v1/sessions", json=body).json()
    assert created["created"] is True and len(created["session_id"]) >= 16
    session = session_of(api, created["session_id"])
    assert session["model_version"] is None and [r["id"] for r in session["results"]] == ["x1", "x2"]
    assert (session["source"], session["key_name"]) == ("ingested", "local-admin")

    named = {**body, "session_id": "ext-session-1"}
    assert api.post("/v1/sessions", json=named).json() == {"session_id": "ext-session-1", "created": True}
    assert api.post("/v1/sessions", json=named).json() == {"session_id": "ext-session-1", "created": False}
    response = api.post("/v1/sessions", json={**named, "query": "something else"})
    assert response.status_code == 409

    for bad, fragment in [({**body, "results": []}, "at least 1"),
                          ({**body, "results": [{"id": "a", "rank": 1}, {"id": "b", "rank": 1}]}, "share a rank"),
                          ({**body, "results": [{"id": "a", "rank": 1}, {"id": "a", "rank": 2}]}, "shown twice"),
                          ({**body, "results": [{"id": "a", "rank": 0}]}, "rank"),
                          ({**body, "query": ""}, "query must not be empty")]:
        response = api.post("/v1/sessions", json=bad)
        assert response.status_code == 422 and fragment in response.json()["error"], response.text


def test_swapped_sessions_show_every_result_once_and_record_the_order_shown(api, items, settings):
    """Search swaps one adjacent pair in a share of anonymous first-page sessions (exploration for the
    position-bias estimate); the response and the recorded ranks are the order shown."""
    share = settings.serve.swap_share
    assert 0 < share < 1
    query, only = "volcano lava flows", {"i": {"exists": True}}
    canonical = ids(search(api, query, limit=10, filter=only, session=False))
    swaps = []
    for _ in range(40):
        body = search(api, query, limit=10, filter=only)
        shown = ids(body)
        session = session_of(api, body["session_id"])
        assert sorted(shown) == sorted(canonical) and len(set(shown)) == len(shown) == 10
        assert [(r["rank"], r["id"]) for r in session["results"]] == list(enumerate(shown, start=1))
        swap = session["swapped_rank"]
        expected = list(canonical)
        if swap is not None:
            assert 1 <= swap <= min(settings.serve.swap_max_rank, 10) - 1
            expected[swap - 1], expected[swap] = expected[swap], expected[swap - 1]
            swaps.append(swap)
        assert shown == expected
    assert 0 < len(swaps) < 40          # some sessions swapped, most not (P(failure) < 1e-4 at share 0.25)
    # A user's own ranking and deeper pages are never swapped; a search without a session neither.
    for _ in range(15):
        personal = search(api, query, limit=10, filter=only, user_id="swap-tester")
        assert session_of(api, personal["session_id"])["swapped_rank"] is None
        deeper = search(api, query, limit=5, offset=2, filter=only)
        assert session_of(api, deeper["session_id"])["swapped_rank"] is None
        assert ids(search(api, query, limit=10, filter=only, session=False)) == canonical
