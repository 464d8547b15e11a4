"""es-ray's Ray metrics reach the head's Prometheus endpoint (what a Prometheus server or the Ray
dashboard scrapes), with the values the requests made."""

from __future__ import annotations

import time
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every es_ray sample on the endpoint."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=30).text):
        for sample in family.samples:
            if "es_ray_" in sample.name:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples, name: str, **labels) -> float:
    """Sum over every series (one per Ray worker) of `name` whose labels include `labels`. Ray exports
    `name` as ray_<name>, counters with the _total suffix."""
    return sum(value for (sample, series), value in samples.items()
               if sample in (f"ray_{name}_total", f"ray_{name}") and set(labels.items()) <= set(series))


def gauge_values(samples, name: str) -> set[float]:
    return {value for (sample, _), value in samples.items() if sample == f"ray_{name}"}


def test_search_click_and_model_metrics_on_the_prometheus_endpoint(stack, api, loaded_collection):
    items, queries, _ = loaded_collection
    assert stack.ray_metrics_url, "the manifest records the head's metrics endpoint"
    before = scrape(stack.ray_metrics_url)
    searches, clicks = 5, 0
    for query in list(queries.values())[:searches]:
        body = api.post("/v1/search", json={"query": query, "limit": 5}).json()
        event = {"event_id": uuid.uuid4().hex, "item_id": body["results"][0]["id"], "type": "click"}
        assert api.post(f"/v1/sessions/{body['session_id']}/events", json={"events": [event]}).status_code == 200
        clicks += 1
    blue = api.get("/healthz").json()["blue"]["model_version"]

    # Ray's agents export every few seconds: wait until the increments show (or fail with what is there).
    deadline, after = time.monotonic() + 90, before
    while time.monotonic() < deadline:
        after = scrape(stack.ray_metrics_url)
        if (total(after, "es_ray_search_requests", status="ok") - total(before, "es_ray_search_requests", status="ok")
                >= searches
                and total(after, "es_ray_click_events", result="accepted")
                - total(before, "es_ray_click_events", result="accepted") >= clicks
                and gauge_values(after, "es_ray_blue_model_version")):
            break
        time.sleep(3)
    assert total(after, "es_ray_search_requests", status="ok") - total(before, "es_ray_search_requests",
                                                                       status="ok") >= searches, sorted(after)[:40]
    assert total(after, "es_ray_sessions", source="search") - total(before, "es_ray_sessions", source="search") \
        >= searches
    assert total(after, "es_ray_click_events", result="accepted") \
        - total(before, "es_ray_click_events", result="accepted") >= clicks
    # One series per driver incarnation (a killed driver's may linger a while): the live one says blue.
    assert blue in gauge_values(after, "es_ray_blue_model_version")
    latency = [name for name, _ in after if "es_ray_search_latency_ms" in name]
    assert any(name.endswith("_bucket") for name in latency) and any(name.endswith("_count") for name in latency)
