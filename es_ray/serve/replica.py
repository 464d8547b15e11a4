"""What one Serve replica holds: the stack's settings and addresses, a Postgres pool, the blue pointer
and Triton clients. Routes reach it through the `replica` dependency.

Settings come from the lifecycle driver (it holds the stack's settings and addresses, so a replica needs
nothing but the cluster), once, at start: new settings come with new replicas (serve/deployment.py).
The driver holds no secrets: the user-token secret is read here, from the state dir or the environment.
"""

from __future__ import annotations

import asyncio
import functools
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import ray
from ray import serve

from es_ray.config import Settings
from es_ray.data import pipeline
from es_ray.logs import get_logger
from es_ray.inference.triton_client import RecentEncoders, TritonEncoder, grpc_address
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.lifecycle.handle import get_driver
from es_ray.serve import auth, schemas
from es_ray.serve.blue_watcher import BlueWatcher
from es_ray.serve.errors import ServiceUnavailable
from es_ray.serve.health_cache import HealthCache
from es_ray.serve.query_vectors import QueryVectors
from es_ray.stack.credentials import with_user_token_secret
from es_ray.stack.manifest import StackManifest
from es_ray.store import db
from es_ray.store.blue_green import Blue

log = get_logger(__name__)


class Replica:
    def __init__(self, namespace: str):
        stack = ray.get(get_driver(namespace).stack.remote())
        self.settings = with_user_token_secret(Settings.model_validate(stack["settings"]))
        self.manifest = StackManifest.model_validate(stack["manifest"])
        schemas.configure_limits(self.settings.serve)
        auth.configure(self.settings.auth)
        self.namespace = namespace
        self.pool_size = pool_size(self.settings)
        pg = self.settings.postgres
        self.pool = db.open_pool(self.manifest.postgres_dsn, self.pool_size, pg.hnsw_ef_search, pg.pool_timeout_s)
        # POST /v1/search's own connections: each statement bounded by search_timeout_ms from the moment a
        # connection opens, autocommit (db.open_pool): a search and its session are a round trip each.
        self.search_pool = db.open_pool(self.manifest.postgres_dsn, self.pool_size, pg.hnsw_ef_search,
                                        pg.pool_timeout_s, statement_timeout_ms=pg.search_timeout_ms, autocommit=True)
        self.health = HealthCache(self.settings.serve.health_cache_s)
        self._check_connection_budget()
        self.blue_watcher = BlueWatcher(self.pool, self.manifest.postgres_dsn, self.settings.serve.blue_refresh_s)
        self._encoders = RecentEncoders()
        # Every page of a query ranks by one vector; a repeated query skips Triton (serve/query_vectors.py).
        self.query_vectors = QueryVectors(self._embed_query, self.settings.serve.query_cache_entries)
        self.random = random.Random()
        self.item_encoders = pipeline.Encoders(self.settings, self.manifest.triton_grpc_url)
        # Threads of its own for a request's blocking work (run_blocking), as many as requests run at once.
        self._executor = ThreadPoolExecutor(self.settings.serve.max_ongoing_requests, thread_name_prefix="request")
        # And for what a request starts beside its own work (hybrid's lexical list): one each, never queued.
        self.beside = ThreadPoolExecutor(self.settings.serve.max_ongoing_requests, thread_name_prefix="beside")

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on the replica's threads. Not Starlette's run_in_threadpool: anyio stops its worker
        threads with the task that started them, and Serve runs each request as a task of its own, so that
        started (and stopped) a thread per request (docs/PERFORMANCE.md)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    @property
    def driver(self):
        """The lifecycle driver, looked up by name at each call: `es-ray up` replaces it when the settings or
        addresses change, and a killed one is started again, while this replica may live on (an `up` with
        the same settings and code leaves it alone); a handle kept from the start would point at a dead
        actor. Only the lifecycle, task and health routes call it."""
        return get_driver(self.namespace)

    def _check_connection_budget(self) -> None:
        """Warns when the replicas' pools together could take every connection Postgres allows."""
        with self.pool.connection() as conn:
            allowed = int(conn.execute("SHOW max_connections").fetchone()[0])
        wanted = self.settings.serve.replicas * (2 * self.pool_size + 1)  # two pools + each one's blue watcher
        if wanted > allowed // 2:  # the driver, jobs, reindex workers and the improvement loop need theirs
            log.warning("replica.pools_near_max_connections", replicas_need=wanted, max_connections=allowed)

    def encoder(self, name: str, blue: Blue) -> TritonEncoder:
        return self._encoders.get(blue.model_version, grpc_address(blue, self.manifest.triton_grpc_url),
                                  lambda: TritonEncoder.of(self.manifest.triton_grpc_url, name, blue, self.settings), name)

    def _embed_query(self, blue: Blue, text: str) -> np.ndarray:
        return self.encoder(QUERY_ENCODER, blue).embed_queries([text])[0]

    def blue(self) -> Blue:
        """The blue pointer as of now; 503 while the stack bootstraps."""
        blue = self.blue_watcher.current
        if blue is None:
            raise ServiceUnavailable("no blue model yet: the stack is still bootstrapping")
        return blue


def pool_size(settings: Settings) -> int:
    """Connections one replica keeps in each of its two pools (searches', the other routes'): enough for
    every request it works on at once (a request holds one connection at a time, and none while it waits
    for Triton; a hybrid search takes a second one beside it only when one is free at once), so a request
    never waits on another request of its own replica; postgres.pool_size when that is larger. The blue
    watcher listens on a connection of its own (serve/blue_watcher.py), outside the pools."""
    needed = settings.serve.max_ongoing_requests
    if settings.postgres.pool_size < needed:
        log.info("replica.pool_sized_to_concurrency", pool_size=needed, configured=settings.postgres.pool_size,
                 max_ongoing_requests=settings.serve.max_ongoing_requests)
    return max(settings.postgres.pool_size, needed)


async def replica() -> Replica:
    """FastAPI dependency: this replica's state (Serve runs one ingress object per replica)."""
    return serve.get_replica_context().servable_object.replica
