"""Work that runs every N seconds in a background thread (heartbeats, the blue pointer's refresh, the
improvement loop, the lifecycle driver's housekeeping)."""

from __future__ import annotations

import threading
from typing import Callable

from es_ray.logs import get_logger

log = get_logger(__name__)


class Periodic:
    """Calls `fn` every `interval_s` seconds in a daemon thread named `name`, until `stop()`. The first
    call is one interval after the start. An exception is logged and the next call comes on time: a
    bad turn (Postgres away, Triton restarting) never ends the loop."""

    def __init__(self, fn: Callable[[], object], interval_s: float, name: str):
        self.fn, self.interval_s, self.name = fn, interval_s, name
        self._stop = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception:  # noqa: BLE001 - see the class docstring
                log.exception("periodic.failed", loop=self.name)

    def stop(self) -> None:
        self._stop.set()
