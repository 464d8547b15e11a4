"""Simulated users: a position-based click model over real search sessions (configs/clicks.yaml)."""

from __future__ import annotations

import dataclasses
import datetime
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from es_ray.client import EsRayClient
from es_ray.config import CONFIG_DIR
from es_ray.demo.addresses import USERS, person_address
from es_ray.serve.exploration import choose_swap, swapped
from es_ray.store.clickstream import LoggedSession


@dataclass
class ClickModel:
    examination_by_rank: list[float]
    click_relevant: float
    click_noise: float
    sessions_per_query: int
    seed: int

    @classmethod
    def load(cls, path: Path = CONFIG_DIR / "clicks.yaml") -> "ClickModel":
        return cls(**yaml.safe_load(path.read_text()))

    def with_noise(self, click_noise: float) -> "ClickModel":
        return dataclasses.replace(self, click_noise=click_noise)

    def clicks(self, shown: list[str], relevant: set[str], rng: random.Random) -> list[str]:
        """Items clicked in one session: examined by rank, clicked by relevance (with noise)."""
        out = []
        for rank, item in enumerate(shown[:len(self.examination_by_rank)]):
            if rng.random() < self.examination_by_rank[rank]:
                if rng.random() < (self.click_relevant if item in relevant else self.click_noise):
                    out.append(item)
        return out


def simulate_session(client: EsRayClient, model: ClickModel, query: str, relevant: set[str], rng: random.Random,
                     user_id: str | None = None, mode: str | None = None) -> int:
    """One search with a recorded session, then its clicks; returns the number of clicks sent."""
    result = client.search(query, limit=len(model.examination_by_rank), user_id=user_id, mode=mode)
    clicked = model.clicks([r.id for r in result.results], relevant, rng)
    if clicked and result.session_id:
        client.click(result.session_id, *clicked)
    return len(clicked)


def simulate_sessions(url: str, queries: dict[str, str], qrels: dict[str, dict[str, int]], model: ClickModel,
                      clients: int = 3, mode: str | None = None, first_person: int = 0) -> tuple[int, int]:
    """`sessions_per_query` searches with clicks for every query, from concurrent simulated users, each
    session a different person from its own loopback address (demo/addresses.py), numbered from
    `first_person` (another number, other people), in search `mode` (None: the default); returns
    (sessions, clicks)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    rng = random.Random(model.seed)
    plan = [(n, q, rng.random()) for n, q in enumerate(q for q in queries for _ in range(model.sessions_per_query))]
    relevant = {q: {d for d, g in qrels[q].items() if g > 0} for q in queries}

    def one(task):
        n, qid, seed = task
        # Anonymous people, one connection each: as many distinct clients to the server as sessions.
        with EsRayClient(url, timeout=120, local_address=person_address(USERS, first_person + n)) as client:
            return simulate_session(client, model, queries[qid], relevant[qid], random.Random(seed), mode=mode)

    with ThreadPoolExecutor(clients) as pool:
        clicks = sum(tqdm(pool.map(one, plan), total=len(plan), desc="simulate", unit="session"))
    return len(plan), clicks


def simulate_log(queries: dict[str, str], shown: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                 model: ClickModel, seed: int, swap_share: float = 0.0, swap_max_rank: int = 10
                 ) -> list[LoggedSession]:
    """The click log that `sessions_per_query` users per query would leave, in-process (no HTTP): each
    session shows `shown[query]` (one adjacent pair swapped in a `swap_share` of sessions, as search
    does: es_ray.serve.exploration) and clicks by the click model. Each session is a person of its own,
    so a client of its own (what the learning guards count)."""
    rng = random.Random(seed)
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    log = []
    for qid in sorted(queries):
        relevant = {d for d, g in qrels.get(qid, {}).items() if g > 0}
        for n in range(model.sessions_per_query):
            results = swapped(shown[qid], choose_swap(len(shown[qid]), swap_share, swap_max_rank, rng))
            clicked = set(model.clicks(results, relevant, rng))
            log.append(LoggedSession(f"{qid}-{n}", queries[qid], False, start + datetime.timedelta(seconds=len(log)),
                                     list(enumerate(results, start=1)), clicked, client=f"simulated-{qid}-{n}"))
    return log
