"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

from es_ray.bench.variants import register_variant  # noqa: F401 - shared with the lifecycle tests


def search(api, query: str, **kwargs) -> dict:
    response = api.post("/v1/search", json={"query": query, **kwargs})
    assert response.status_code == 200, response.text
    return response.json()


def ids(response: dict) -> list[str]:
    return [r["id"] for r in response["results"]]

