"""Connections: a psycopg 3 pool with pgvector registered on every connection, and the schema."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import OperationalError  # noqa: F401 - re-exported for callers
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

SCHEMA = Path(__file__).with_name("schema.sql")


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)


def connect(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    _configure(conn)
    return conn


def open_pool(dsn: str, size: int = 4, hnsw_ef_search: int | None = None, timeout_s: float = 30) -> ConnectionPool:
    """A pool that survives a Postgres restart: a connection is checked before it is handed out (a dead
    one is replaced), and a caller waits at most timeout_s for one (PoolTimeout, an OperationalError:
    the API answers 503 with Retry-After) instead of hanging while the database is away."""
    def configure(conn: psycopg.Connection) -> None:
        _configure(conn)
        if hnsw_ef_search:
            conn.execute(f"SET hnsw.ef_search = {int(hnsw_ef_search)}")
            # Filtered HNSW queries keep scanning until enough rows pass the filter (pgvector >= 0.8).
            conn.execute("SET hnsw.iterative_scan = strict_order")
        conn.commit()

    pool = ConnectionPool(dsn, min_size=1, max_size=size, configure=configure, open=True, timeout=timeout_s,
                          check=ConnectionPool.check_connection, kwargs={"autocommit": False})
    pool.wait(timeout=30)
    return pool


def migrate(dsn: str) -> None:
    """Creates the extension and control tables; safe to run at every start (and concurrently)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # One migrator at a time: two starting processes would race on CREATE ... IF NOT EXISTS.
        conn.execute("SELECT pg_advisory_lock(7401)")
        try:
            conn.execute(SCHEMA.read_text())
        finally:
            conn.execute("SELECT pg_advisory_unlock(7401)")
