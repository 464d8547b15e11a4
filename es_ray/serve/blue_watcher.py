"""A replica's view of the blue pointer, re-read when Postgres says it changed.

Every change of the `blue` row notifies the channel `es_ray_blue` (a trigger, migration 0007), so a
switch reaches every replica as soon as it commits, while an idle replica reads nothing. The watcher
LISTENs on a connection of its own and re-reads the pointer on each notification, and at least every
`refresh_s` anyway (a notification cannot be lost on a live connection, but the read is the proof). A
lost connection (Postgres restarted) is opened again, the pointer re-read at once, since notifications
sent meanwhile were missed; until then the last known pointer keeps serving.

The collections' promoted fusions (store/fusion_weights.py) are read with the pointer: a promotion
notifies the same channel, and a search then reads neither from Postgres.
"""

from __future__ import annotations

import threading

import psycopg

from es_ray.logs import get_logger
from es_ray.store import blue_green, db, fusion_weights
from es_ray.store.blue_green import Blue
from es_ray.store.fusion import Fusion

log = get_logger(__name__)


# The watch connection idles for long stretches: over TCP (an external Postgres, a load balancer or NAT
# between) a peer that vanished without a word would leave it waiting for minutes. TCP keepalives and a
# user timeout end it within about 30 s, and the loop connects again (libpq ignores them on a unix socket).
DEAD_PEER_DETECTION = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                       "tcp_user_timeout": 30000}


class BlueWatcher:
    """Keeps the replica's view of the blue pointer fresh.

    A request takes one snapshot at its start and uses it to the end, so a switch never mixes two
    models or collections inside one response.
    """

    def __init__(self, pool, dsn: str, refresh_s: float, retry_s: float = 1.0):
        self.dsn, self.refresh_s, self.retry_s = dsn, refresh_s, retry_s
        with pool.connection() as conn:
            self.current: Blue | None = blue_green.get_blue(conn)
            self.fusions: dict[str, Fusion] = fusion_weights.learned(conn)   # collection -> promoted fusion
        self.reads = 0                        # how often it re-read the pointer (tests, logs)
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="blue-watcher", daemon=True).start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                with db.connect(self.dsn, **DEAD_PEER_DETECTION) as conn:
                    conn.execute(f"LISTEN {blue_green.BLUE_CHANNEL}")
                    self._read(conn)          # what changed while nobody listened
                    while not self._stopped.is_set():
                        self._wait(conn)
                        self._read(conn)
            except Exception as err:  # noqa: BLE001 - keep the last known pointer while Postgres is away
                # Again every retry_s (a connection attempt is cheap): the pointer is read again within
                # about retry_s of Postgres being back.
                log.warning("blue.watch_failed", error=str(err), retry_s=self.retry_s)
                self._stopped.wait(self.retry_s)

    def _wait(self, conn: psycopg.Connection) -> None:
        """Until a notification (or refresh_s): one read for each burst. psycopg's own notifies(timeout=...)
        wakes every 0.1 s to look at its deadline, ten wake-ups a second of an idle replica; this sleeps until
        the socket has data (db.readable). Those that arrived during the last read (psycopg keeps them) come
        first; a closed connection makes the socket readable and the drain below raise."""
        if list(conn.notifies(timeout=0)):
            return
        db.readable(conn, self.refresh_s)
        list(conn.notifies(timeout=0))

    def _read(self, conn: psycopg.Connection) -> None:
        # Fusions first: a request that sees a new blue sees fusions read no earlier than it; a fusion
        # promoted between the two reads notifies again, and the next read takes it.
        self.fusions = fusion_weights.learned(conn)
        self.current = blue_green.get_blue(conn)
        self.reads += 1

    def stop(self) -> None:
        """Ends the watch after its current wait (at most refresh_s); the thread is a daemon."""
        self._stopped.set()
