"""Small helpers shared by the end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from es_ray.bench.variants import register_variant  # noqa: F401 - shared with the lifecycle tests
from es_ray.stack.processes import listening_on, stack_processes


# A filter the GIN index cannot answer: with no HNSW index every row is tested against 500 containments,
# which takes far longer than a few milliseconds (the statement-timeout tests).
COSTLY_FILTER = {"not": {"n": {"in": list(range(-500, 0))}}}


def slow_collection(conn, rows: int = 2000):
    """A collection of `rows` random 8-dim items without an HNSW index; returns it and its vectors (item
    i{n} is vectors[n])."""
    import numpy as np

    from es_ray.store.collections import Collection, EmbeddedItem

    collection = Collection("slow", 8)
    collection.create(conn, index=False)
    vectors = np.random.default_rng(0).normal(size=(rows, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    collection.upsert(conn, [EmbeddedItem(id=f"i{n}", payload={"n": n}, chunks=vectors[n:n + 1])
                             for n in range(rows)])
    return collection, vectors


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


def leftovers(state_dir: Path, before: set[int], ports: set[int], wait_s: float = 10) -> dict[str, list]:
    """What a stack left after `down`: its processes (es_ray/stack/processes.py), zombies among this
    process's children that were not there before, and listeners on its ports. Processes that are
    stopping get wait_s to go."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {
            "processes": [f"{p.pid} {' '.join(_cmdline(p))[:120]}" for p in stack_processes(state_dir)],
            "zombie_children": [f"{p.pid} {_name(p)}" for p in psutil.Process().children()
                                if p.pid not in before and _status(p) == psutil.STATUS_ZOMBIE],
            "listening": listening_on(ports),
        }
        if not any(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "?"


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except psutil.Error:
        return "gone"
