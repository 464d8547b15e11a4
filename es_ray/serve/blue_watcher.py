"""A replica's view of the blue pointer, kept fresh by polling Postgres in the background."""

from __future__ import annotations

from es_ray.logs import get_logger
from es_ray.periodic import Periodic
from es_ray.store import blue_green
from es_ray.store.blue_green import Blue

log = get_logger(__name__)


class BlueWatcher:
    """Keeps the replica's view of the blue pointer fresh by polling Postgres in the background.

    A request takes one snapshot at its start and uses it to the end, so a switch never mixes two
    models or collections inside one response.
    """

    def __init__(self, pool, refresh_s: float):
        self.pool, self.refresh_s = pool, refresh_s
        self.current: Blue | None = self._read()
        self._refresh = Periodic(self._poll, refresh_s, "blue-watcher")

    def _read(self) -> Blue | None:
        with self.pool.connection() as conn:
            return blue_green.get_blue(conn)

    def _poll(self) -> None:
        try:
            self.current = self._read()
        except Exception as err:  # noqa: BLE001 - keep the last known pointer while Postgres is away
            log.warning("blue.refresh_failed", error=str(err))

    def stop(self) -> None:
        self._refresh.stop()
