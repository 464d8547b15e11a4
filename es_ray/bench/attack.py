"""An attacker beside normal traffic: what an anonymous client can do to other people's results and speed.

    python -m es_ray.bench.load --only attack     (the attack phase of `make load`; loopback only)

The collection is es-ray's own fixture (tests/fixtures/collection), loaded into the benchmark stack. Normal
traffic is `people` threads of anonymous searches, each search from a person's own loopback address
(demo/addresses.py), over a fixed set of 50 queries. The attacker sends from one address of its own
(127.0.0.2) at a fixed rate, in turn:
- a fabricated session (POST /v1/sessions without a key) with a click on a chosen item,
- a click farm: a search for one of the 50 queries and a click on its 10th result, again and again,
- a giant filter (70 `in` lists of 1,000 values),
- a malformed user token (`u1.YQ.1.é`) and a forged one,
- events on a session id es-ray never signed.
The phase measures the normal searches' p99 without and with the attacker, their errors under attack,
what the attacker was answered, and, after an improvement pass over everything recorded, how many of
the 50 queries' top-10 (as other people see it) changed.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from es_ray.bench.common import percentiles
from es_ray.client import EsRayClient
from es_ray.data.corpus import read_corpus, read_queries
from es_ray.demo.addresses import MEASUREMENT, person_address

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "collection"
ATTACKER_ADDRESS = "127.0.0.2"
QUERIES = 50


def fixture_collection(folder: Path = FIXTURE) -> tuple[list[dict], list[str]]:
    """The fixture's documents (as items) and the texts of its first QUERIES queries, in id order."""
    items = list(read_corpus(folder / "corpus.jsonl"))
    queries = read_queries(folder / "queries.jsonl")
    return items, [queries[q] for q in sorted(queries)[:QUERIES]]


@dataclass
class People:
    """`threads` threads of anonymous searches, each search a new person from its own loopback address;
    every answer's status and latency recorded."""

    url: str
    queries: list[str]
    threads: int = 8
    outcomes: list[tuple[int, float]] = field(default_factory=list)   # (status, seconds); status 0: no answer
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "People":
        self._counter = itertools.count()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for worker in self._workers:
            worker.join(timeout=120)

    def _run(self) -> None:
        while not self.stop.is_set():
            n = next(self._counter)
            request = EsRayClient.search_request(self.queries[n % len(self.queries)], limit=10, session=False)
            started = time.monotonic()
            try:
                with EsRayClient(self.url, timeout=60, local_address=person_address(MEASUREMENT, n)) as client:
                    status = client.send("POST", "/v1/search", request).status_code
            except httpx.TransportError:
                status = 0
            self.outcomes.append((status, time.monotonic() - started))

    def summary(self) -> dict:
        ok = [seconds for status, seconds in self.outcomes if status == 200]
        return {"requests": len(self.outcomes), "errors": sum(1 for status, _ in self.outcomes if status != 200),
                "statuses": dict(Counter(str(status) for status, _ in self.outcomes)),
                "latency": percentiles(ok) if ok else {}}


@dataclass
class Attacker:
    """One client (one address) sending at a fixed request rate whatever the answers' latency (requests
    start on a schedule, up to `in_flight` at once; those the service has not let start by the end are dropped), cycling through the attacks of the module's docstring."""

    url: str
    queries: list[str]
    rate: float = 50.0
    target: str = "d-1"                                  # the item fabricated sessions and events click
    in_flight: int = 64
    statuses: Counter = field(default_factory=Counter)   # "<attack> <status>" -> count
    sent: int = 0                                        # requests started before the stop
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Attacker":
        self._farmed: deque[tuple[str, str]] = deque(maxlen=1000)   # (session id, 10th result) to click
        self._lock = threading.Lock()
        self._n = itertools.count()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(timeout=180)

    def _run(self) -> None:
        attacks = [self._fabricated_session, self._farm_search, self._farm_click, self._giant_filter,
                   self._bad_token, self._unsigned_session]
        transport = httpx.HTTPTransport(local_address=ATTACKER_ADDRESS,
                                        limits=httpx.Limits(max_connections=self.in_flight))
        pool = ThreadPoolExecutor(self.in_flight)
        with httpx.Client(base_url=self.url, timeout=60, transport=transport) as client:
            next_at = time.monotonic()
            for k in itertools.count():
                if self.stop.is_set():
                    break
                pool.submit(self._send, attacks[k % len(attacks)], client)
                next_at += 1 / self.rate
                self.stop.wait(max(0.0, next_at - time.monotonic()))
            # What the service has not started by the end stays unsent: the phase is the window, not a backlog.
            pool.shutdown(wait=True, cancel_futures=True)

    def _send(self, attack, client: httpx.Client) -> None:
        if self.stop.is_set():
            return
        with self._lock:
            self.sent += 1
        try:
            status = attack(client)
        except httpx.TransportError:
            status = 0
        with self._lock:
            self.statuses[f"{attack.__name__.lstrip('_')} {status}"] += 1

    def _query(self) -> str:
        return self.queries[next(self._n) % len(self.queries)]

    def _fabricated_session(self, client: httpx.Client) -> int:
        session = {"session_id": f"fab-{uuid.uuid4().hex}", "query": self._query(),
                   "results": [{"id": self.target, "rank": 1}]}
        return client.post("/v1/sessions", json=session).status_code

    def _farm_search(self, client: httpx.Client) -> int:
        answer = client.post("/v1/search", json={"query": self._query(), "limit": 10})
        if answer.status_code == 200 and len(answer.json()["results"]) == 10 and answer.json()["session_id"]:
            self._farmed.append((answer.json()["session_id"], answer.json()["results"][9]["id"]))
        return answer.status_code

    def _farm_click(self, client: httpx.Client) -> int:
        """A click on the 10th result of a farmed search (a search first where none is waiting)."""
        try:
            session, item = self._farmed.popleft()
        except IndexError:
            return self._farm_search(client)
        event = {"events": [{"event_id": "e-1", "item_id": item, "type": "click"}]}
        return client.post(f"/v1/sessions/{session}/events", json=event).status_code

    def _giant_filter(self, client: httpx.Client) -> int:
        giant = {"and": [{f"f{k}": {"in": [f"v{v}" for v in range(1000)]}} for k in range(70)]}
        return client.post("/v1/search", json={"query": self._query(), "filter": giant}).status_code

    def _bad_token(self, client: httpx.Client) -> int:
        token = "u1.YQ.1.é" if next(self._n) % 2 else "u1.YQ.9999999999.forged"
        return client.post("/v1/search", json={"query": self._query(), "user_id": "u1"},
                           headers={"X-User-Token": token.encode()}).status_code

    def _unsigned_session(self, client: httpx.Client) -> int:
        event = {"events": [{"event_id": "e-1", "item_id": self.target, "type": "click"}]}
        return client.post(f"/v1/sessions/s1.{uuid.uuid4().hex}.0000/events", json=event).status_code


def top10(api: EsRayClient, queries: list[str]) -> list[list[str]]:
    """The 50 queries' top-10 as an anonymous person sees them (no session recorded)."""
    return [[r.id for r in api.search(q, limit=10, session=False).results] for q in queries]


def attack_phase(api: EsRayClient, url: str, seconds: float, rate: float, people: int) -> dict:
    """The phase of the module's docstring; returns the results file's fields."""
    items, queries = fixture_collection()
    api.upsert_items(items)
    api.run_improvement(settle_s=0)   # what earlier traffic left is learned before the "before"
    before = top10(api, queries)
    with People(url, queries, people) as calm:
        time.sleep(seconds)
    with People(url, queries, people) as busy, Attacker(url, queries, rate, items[-1]["id"]) as attacker:
        time.sleep(seconds)
    sent_rate = attacker.sent / seconds   # below `rate` where the service answers slower than the attacker sends
    improvement = api.run_improvement(settle_s=0)
    after = top10(api, queries)
    without, under = calm.summary(), busy.summary()
    return {
        "attack_rate": rate, "attack_rate_sent": round(sent_rate, 1), "attack_seconds": seconds,
        "attack_statuses": dict(sorted(attacker.statuses.items())), "normal_people_threads": people,
        "normal_without": without, "normal_with": under,
        "normal_errors_under_attack": under["errors"],
        "p99_ms_without": without["latency"].get("p99_ms"), "p99_ms_with": under["latency"].get("p99_ms"),
        "improvement_after_attack": improvement,
        "queries_compared": len(queries), "top10_changed": sum(1 for b, a in zip(before, after) if b != a)}
