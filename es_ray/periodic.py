"""Work that runs every N seconds in a background thread (heartbeats, the improvement loop, the lifecycle
driver's housekeeping), backing off while there is nothing to do."""

from __future__ import annotations

import threading
from typing import Callable

from es_ray.logs import get_logger

log = get_logger(__name__)


class Periodic:
    """Calls `fn` every `interval_s` seconds in a daemon thread named `name`, until `stop()`. The first
    call is one interval after the start. An exception is logged and the next call comes on time: a
    bad turn (Postgres away, Triton restarting) never ends the loop.

    With `max_interval_s`, a turn whose `fn` returns a falsy value found nothing to do: the next wait
    doubles, up to `max_interval_s`, so an idle stack wakes rarely (each wake costs a few queries, and
    on a small machine every process waking often adds up). A truthy answer, an exception, or `wake()`
    brings the interval back to `interval_s`; `wake()` also runs the next turn at once (new work arrived).
    """

    def __init__(self, fn: Callable[[], object], interval_s: float, name: str, max_interval_s: float | None = None):
        self.fn, self.interval_s, self.name = fn, interval_s, name
        self.max_interval_s = max(interval_s, max_interval_s or interval_s)
        self.wait_s = interval_s             # the current wait (for tests and logs)
        self._wake = threading.Event()
        self._stopped = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self.wait_s)
            self._wake.clear()
            if self._stopped:
                return
            try:
                busy = bool(self.fn())
            except Exception:  # noqa: BLE001 - see the class docstring
                log.exception("periodic.failed", loop=self.name)
                busy = True
            self.wait_s = self.interval_s if busy or woken else min(self.wait_s * 2, self.max_interval_s)

    def wake(self) -> None:
        """Work arrived: run a turn now and go back to the short interval."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
