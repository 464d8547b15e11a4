"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

from es_ray.bench.variants import register_variant  # noqa: F401 - shared with the lifecycle tests


def search(api, query: str, **kwargs) -> dict:
    response = api.post("/v1/search", json={"query": query, **kwargs})
    assert response.status_code == 200, response.text
    return response.json()


def ids(response: dict) -> list[str]:
    return [r["id"] for r in response["results"]]



def person(url: str, n: int):
    """An anonymous client of its own: an httpx client sending from loopback address 127.0.0.n (n >= 2;
    the tests' other clients send from 127.0.0.1). Global learning counts distinct clients (learning
    guards): n people clicking teach everybody, one client clicking n times does not."""
    import httpx

    return httpx.Client(base_url=url, timeout=120, transport=httpx.HTTPTransport(local_address=f"127.0.0.{n}"))


def click_as_people(url: str, query: str, target: str, people: int, limit: int = 30) -> None:
    """`people` distinct anonymous clients each search `query` without a filter (a filtered session
    teaches nobody else) and click `target`."""
    for n in range(2, 2 + people):
        with person(url, n) as client:
            shown = search(client, query, limit=limit)
            assert target in ids(shown), (target, ids(shown))
            event = {"events": [{"event_id": "e-1", "item_id": target, "type": "click"}]}
            assert client.post(f"/v1/sessions/{shown['session_id']}/events", json=event).json()["accepted"] == 1
