"""Rate limits: how many requests one client, and one session, may send without an API key.

A search engine's public routes are open to anyone, so what one client can do is bounded by rate instead
of by credential: searches and clickstream writes per client (clients.py says what a client is), reads of
sessions per client, and writes into one session per session id. Each is a moving window (the `limits`
library): at most N requests in any period of the configured length, so a client cannot double its
rate at a window's edge as it could with fixed windows. A request over a limit is refused with 429 and
a Retry-After of the seconds until the oldest request in the window leaves it; a refused request takes
no slot. Requests with a valid API key (the operator, keyed ingestion, the benchmarks) are never limited;
a user's token is not an exemption (anyone may hold one of their own). The numbers are
serve.rate_limits in configs/stack.yaml.

The counts are kept in the memory of each replica: the bound for the service is replicas x limit.
A shared store (Redis, or a table in Postgres) would make it one bound, at the price of a round trip on
every request and another system that every search depends on; the limits exist to bound what one
client can teach and cost, and a small constant factor does not change that. Keeping them in memory
also means a restarted replica forgets its counts, which errs on the side of serving.

An IPv6 client is counted by its /64 network (clients.py): one host commonly holds a whole /64 and could
otherwise take a new address for every request.
"""

from __future__ import annotations

import math
import time

from fastapi import Depends, Security
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from es_ray import metrics
from es_ray.config import RateLimitSettings
from es_ray.serve import auth, clients
from es_ray.serve.auth import Caller
from es_ray.serve.errors import RateLimited


def _message(name: str, limit: RateLimitItem, per: str, retry_after_s: int) -> str:
    return (f"rate limit exceeded: {limit.amount} requests per {_period(limit)} per {per} "
            f"(serve.rate_limits.{name}); retry in {retry_after_s} s")


def _period(limit: RateLimitItem) -> str:
    unit = limit.GRANULARITY.name
    return unit if limit.multiples == 1 else f"{limit.multiples} {unit}s"


class RateLimiter:
    """Moving-window counts per (limit, key), in this process's memory. Thread-safe (the library locks
    per key), as Serve runs sync routes and dependencies on a thread pool."""

    def __init__(self, settings: RateLimitSettings):
        self.limits = {name: parse(text) for name, text in settings.model_dump().items()}
        self._windows = MovingWindowRateLimiter(MemoryStorage())

    def charge(self, name: str, key: str, per: str = "client") -> None:
        """Counts one request of `key` under limit `name`; raises RateLimited if its window is full."""
        limit = self.limits[name]
        if self._windows.hit(limit, name, key):
            return
        frees_at = self._windows.get_window_stats(limit, name, key).reset_time
        metrics.count("es_ray_rate_limited", limit=name)
        retry_after_s = max(1, math.ceil(frees_at - time.time()))
        raise RateLimited(_message(name, limit, per, retry_after_s), name, retry_after_s)


_limiter: RateLimiter | None = None


def configure(settings: RateLimitSettings) -> None:
    """Called once per Serve replica (serve/app.py) with the stack's settings."""
    global _limiter
    _limiter = RateLimiter(settings)


def limiter() -> RateLimiter:
    if _limiter is None:
        raise RuntimeError("rate_limits.configure() has not run in this process")
    return _limiter


# --- FastAPI dependencies: a route lists the limits it is charged to -----------------------------------

def _per_client(name: str):
    async def charge(who: Caller = Security(auth.caller), client: str = Depends(clients.client_identity)) -> None:
        if not who.admin:
            limiter().charge(name, client)  # an IPv6 client is its /64 (clients.py)
    charge.__name__ = f"limit_{name}_per_client"
    return charge


search = _per_client("search")
clickstream = _per_client("clickstream")
session_reads = _per_client("session_reads")


async def session_writes(session_id: str, who: Caller = Security(auth.caller)) -> None:
    """Writes into one session, whoever sends them: many clients cannot pile clicks onto one result list."""
    if not who.admin:
        limiter().charge("session_writes", session_id, per="session")
