"""Search traffic kept up while a cycle deploys, reindexes and switches: every request's outcome is kept,
so the demo can say how many failed (the switch must not fail any) and which models answered."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from es_ray.client import EsRayClient, EsRayError
from es_ray.demo.addresses import TRAFFIC, person_address


@dataclass
class TrafficReport:
    requests: int = 0
    failed: int = 0
    models: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"requests": self.requests, "failed": self.failed, "models": dict(self.models),
                "errors": dict(self.errors.most_common(5))}


class SearchTraffic:
    """`clients` threads searching `queries` in turn (think time between requests) until stopped. Each
    search is a different anonymous person from its own loopback address (demo/addresses.py): one
    thread's pace is a crowd's, and from one address it would run into the per-client rate limit."""

    def __init__(self, url: str, queries: list[str], clients: int, think_s: float):
        self.url, self.queries, self.clients, self.think_s = url, queries, clients, think_s
        self.report = TrafficReport()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "SearchTraffic":
        for n in range(self.clients):
            thread = threading.Thread(target=self._client, args=(n,), name=f"traffic-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _client(self, n: int) -> None:
        k = n
        while not self._stop.is_set():
            query = self.queries[k % len(self.queries)]
            try:
                with EsRayClient(self.url, timeout=60, local_address=person_address(TRAFFIC, k)) as client:
                    ok, outcome = True, client.search(query, limit=10, session=False).model
            except EsRayError as err:
                ok, outcome = False, f"HTTP {err.status}"
            except httpx.HTTPError as err:
                ok, outcome = False, type(err).__name__
            k += self.clients
            with self._lock:
                self.report.requests += 1
                if ok:
                    self.report.models[outcome] += 1
                else:
                    self.report.failed += 1
                    self.report.errors[outcome] += 1
            time.sleep(self.think_s)
