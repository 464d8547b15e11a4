"""A replica's health answer, checked at most once per period and by one request at a time.

Checking health asks the lifecycle driver (which opens a Postgres connection and asks MLflow) and
Triton. Public /healthz is cheap to call and the driver is busy with switches and improvement passes:
without a cache a flood of health checks queues behind them and takes every thread of the replica.
So the answer is reused for `period_s`; when it is older, one request checks again while the others
keep getting the previous answer (at most one check older). Only a replica that has never checked
makes its requests wait, for that first check.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Generic, TypeVar

Answer = TypeVar("Answer")


class HealthCache(Generic[Answer]):
    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic):
        self.period_s, self._clock = period_s, clock
        self._refreshing = threading.Lock()   # held by the one request that checks
        self._answer: Answer | None = None
        self._checked_at = 0.0
        self.checks = 0                       # how many times `check` ran (for tests and logs)

    def get(self, check: Callable[[], Answer]) -> Answer:
        """The cached answer while it is fresh; else `check()`'s, run by one caller at a time."""
        if self._fresh():
            return self._answer
        if self._answer is not None:
            if not self._refreshing.acquire(blocking=False):
                return self._answer           # another request is checking: no queue behind it
        else:
            self._refreshing.acquire()        # nothing to answer yet: wait for the first check
        try:
            if self._fresh():                 # checked by another request while this one waited
                return self._answer
            answer = check()
            self.checks += 1
            self._answer, self._checked_at = answer, self._clock()
            return answer
        finally:
            self._refreshing.release()

    def _fresh(self) -> bool:
        return self._answer is not None and self._clock() - self._checked_at < self.period_s
