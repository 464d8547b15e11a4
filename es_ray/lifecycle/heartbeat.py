"""A job's heartbeat: refreshes its task row (and progress) and renews the locks it holds."""

from __future__ import annotations

import threading
from typing import Any

from es_ray.logs import get_logger
from es_ray.periodic import Periodic
from es_ray.store import db, locks, tasks

log = get_logger(__name__)


class Heartbeat:
    """Refreshes the task's heartbeat and progress every `interval_s` from a background thread; with
    `lock` (name, owner, lease_s) it renews that lock too."""

    def __init__(self, dsn: str, task_id: str, interval_s: float, lock: tuple[str, str, float] | None = None):
        self.conn, self.task_id, self.interval_s, self.lock = db.connect(dsn), task_id, interval_s, lock
        self.progress: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._beats = Periodic(self._beat, interval_s, "task-heartbeat")

    def update(self, progress: dict[str, Any]) -> None:
        self.progress = {**self.progress, **progress}
        self._beat()

    def _beat(self) -> None:
        with self._lock:
            try:
                tasks.heartbeat(self.conn, self.task_id, self.progress)
                if self.lock and not locks.renew(self.conn, *self.lock):
                    log.warning("lock.lost", name=self.lock[0], owner=self.lock[1])
            except Exception as err:  # noqa: BLE001 - a missed beat is retried; the lease is generous
                log.warning("task.heartbeat_failed", task_id=self.task_id, error=str(err))

    def stop(self) -> None:
        self._beats.stop()
