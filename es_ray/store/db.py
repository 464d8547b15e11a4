"""Connections: a psycopg 3 pool with pgvector registered on every connection, and the schema."""

from __future__ import annotations

import select
from pathlib import Path

import psycopg
from psycopg import OperationalError  # noqa: F401 - re-exported for callers
from psycopg.conninfo import conninfo_to_dict
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

MIGRATIONS = Path(__file__).with_name("migrations")  # NNNN_<what>.sql, applied in order, each once


def _configure(conn: psycopg.Connection) -> None:
    register_vector(conn)


def connect(dsn: str, **options) -> psycopg.Connection:
    """An autocommit connection; `options` are libpq's (keepalives, timeouts)."""
    conn = psycopg.connect(dsn, autocommit=True, **options)
    _configure(conn)
    return conn


def open_pool(dsn: str, size: int = 4, hnsw_ef_search: int | None = None, timeout_s: float = 30,
              statement_timeout_ms: int | None = None, autocommit: bool = False, wait: bool = True) -> ConnectionPool:
    """A pool that survives a Postgres restart: a connection whose server went away is replaced before it is
    handed out (alive() below), and a caller waits at most timeout_s for one (PoolTimeout, an
    OperationalError: the API answers 503 with Retry-After) instead of hanging while the database is away.

    statement_timeout_ms: Postgres cancels any statement on these connections that runs longer, set once
    when a connection opens (libpq's startup options: no round trip) rather than by a SET in every request's
    transaction. The Serve replica's search pool has it, and autocommit: a search is one statement and its
    session record another, each atomic on its own, so a transaction around them would only add its BEGIN
    and COMMIT round trips (reads in READ COMMITTED take a snapshot per statement either way).

    wait: return once the first connection is open (PoolTimeout after 30 s without one); False returns at
    once and the pool connects in the background, for an owner that must start while Postgres is away."""
    def configure(conn: psycopg.Connection) -> None:
        _configure(conn)
        if hnsw_ef_search:
            conn.execute(f"SET hnsw.ef_search = {int(hnsw_ef_search)}")
            # Filtered HNSW queries keep scanning until enough rows pass the filter (pgvector >= 0.8). Relaxed:
            # a later batch's nearer rows are kept, not dropped; store/search.py sorts them into place.
            conn.execute("SET hnsw.iterative_scan = relaxed_order")
        conn.commit()

    kwargs: dict = {"autocommit": autocommit}
    if statement_timeout_ms:  # beside any options the DSN gives (a keyword argument would replace them)
        given = conninfo_to_dict(dsn).get("options", "")
        kwargs["options"] = f"{given} -c statement_timeout={int(statement_timeout_ms)}".strip()
    pool = ConnectionPool(dsn, min_size=1, max_size=size, configure=configure, open=True, timeout=timeout_s,
                          check=alive, kwargs=kwargs)
    if wait:
        pool.wait(timeout=30)
    return pool


def alive(conn: psycopg.Connection) -> None:
    """The pool's check before it hands a connection out, without a round trip per checkout (psycopg_pool's
    check_connection sends an empty query every time). A connection whose server went away (Postgres
    stopped or restarted, its backend terminated) has the server's last message or the end of the stream
    waiting on its socket while it sits idle in the pool: only then the full check runs, fails, and the pool
    opens another connection for the caller. Nothing waiting: nothing reached it since its last use. (A
    network cut that delivers no packet at all answers the round trip no better: TCP keepalives find it.)"""
    if readable(conn, 0):
        ConnectionPool.check_connection(conn)


def readable(conn: psycopg.Connection, timeout_s: float) -> bool:
    """Whether the connection's socket holds something to read, waiting up to timeout_s for it. poll, not
    select: a process with many files has descriptors past select's 1024."""
    waiting = select.poll()
    waiting.register(conn.fileno(), select.POLLIN)
    return bool(waiting.poll(timeout_s * 1000))


def migrations() -> list[tuple[int, Path]]:
    """(number, file) of every migration, in order."""
    found = sorted((int(path.name.split("_", 1)[0]), path) for path in MIGRATIONS.glob("[0-9]*_*.sql"))
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1, 2, 3... without gaps: {numbers}")
    return found


def migrate(dsn: str) -> list[int]:
    """Applies the migrations this database has not had, each in its own transaction and recorded in
    `schema_migrations`; returns their numbers. Safe at every start and from concurrent processes."""
    applied = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        # One migrator at a time: the others wait, then find nothing left to do.
        conn.execute("SELECT pg_advisory_lock(7401)")
        try:
            conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                                version    integer PRIMARY KEY,
                                name       text NOT NULL,
                                applied_at timestamptz NOT NULL DEFAULT now())""")
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for number, path in migrations():
                if number in done:
                    continue
                with conn.transaction():
                    conn.execute(path.read_text())
                    conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (number, path.stem))
                applied.append(number)
        finally:
            conn.execute("SELECT pg_advisory_unlock(7401)")
    return applied


def schema_version(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()[0]
