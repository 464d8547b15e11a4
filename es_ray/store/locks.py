"""Named locks in Postgres with an owner and a lease.

A reindex and a switch each hold the `lifecycle` lock, so only one of them runs at a time, whoever
starts it. The holder renews the lease while it works; a holder that dies stops renewing and its lock
expires after the lease instead of blocking forever (and is released at once when its job is known
to have ended).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

LIFECYCLE = "lifecycle"


class LockHeld(RuntimeError):
    """Another owner holds the lock and its lease has not expired."""


@dataclass(frozen=True)
class Lock:
    name: str
    owner: str
    acquired_at: datetime
    expires_at: datetime


def acquire(conn: psycopg.Connection, name: str, owner: str, lease_s: float) -> Lock:
    """Takes the lock (or renews it for the same owner, or takes over an expired one); LockHeld otherwise."""
    row = conn.execute(
        """INSERT INTO locks (name, owner, expires_at) VALUES (%s, %s, now() + make_interval(secs => %s))
           ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at,
               acquired_at = CASE WHEN locks.owner = EXCLUDED.owner THEN locks.acquired_at ELSE now() END
           WHERE locks.owner = EXCLUDED.owner OR locks.expires_at < now()
           RETURNING name, owner, acquired_at, expires_at""", (name, owner, lease_s)).fetchone()
    if row is None:
        holder = get(conn, name)
        raise LockHeld(f"the {name} lock is held by {holder.owner} until {holder.expires_at:%H:%M:%S}Z"
                       if holder else f"the {name} lock is held")
    return Lock(*row)


def renew(conn: psycopg.Connection, name: str, owner: str, lease_s: float) -> bool:
    """Extends the lease; False if the owner lost the lock (it expired and someone else took it)."""
    return conn.execute("""UPDATE locks SET expires_at = now() + make_interval(secs => %s)
                           WHERE name = %s AND owner = %s""", (lease_s, name, owner)).rowcount == 1


def release(conn: psycopg.Connection, name: str, owner: str) -> bool:
    return conn.execute("DELETE FROM locks WHERE name = %s AND owner = %s", (name, owner)).rowcount == 1


def release_owned_by(conn: psycopg.Connection, owner: str) -> int:
    return conn.execute("DELETE FROM locks WHERE owner = %s", (owner,)).rowcount


def get(conn: psycopg.Connection, name: str) -> Lock | None:
    row = conn.execute("SELECT name, owner, acquired_at, expires_at FROM locks WHERE name = %s", (name,)).fetchone()
    return Lock(*row) if row else None


def all_locks(conn: psycopg.Connection) -> list[Lock]:
    return [Lock(*r) for r in conn.execute("SELECT name, owner, acquired_at, expires_at FROM locks ORDER BY name")]


def try_transaction_lock(conn: psycopg.Connection, key: str) -> bool:
    """A Postgres advisory lock held until the transaction ends; False (at once) if another holds it."""
    return conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (key,)).fetchone()[0]


def transaction_lock(conn: psycopg.Connection, key: str) -> None:
    """The same lock, waiting for it."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (key,))


def session_lock(conn: psycopg.Connection, key: str) -> None:
    """The same lock held by the connection's session, across transactions, until `session_unlock`."""
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (key,))


def session_unlock(conn: psycopg.Connection, key: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
