"""Retry policies: the `retries` section of configs/stack.yaml turned into tenacity `Retrying` objects.

Every call es-ray tries again goes through here, so how often and how long it waits is read in one
place and changed in the configuration. A policy is named after what it retries (`mlflow`, `embed`,
`write`, `reindex_write`); the caller keeps what happens after the last try (raise, record the items as
failed), since that differs from one caller to the next.

    for attempt in retrying(settings.retries.write, "write"):
        with attempt:
            ...

The last try's own exception comes out (`reraise`), not tenacity's `RetryError`. Code that wants
another try for a reason of its own (the live collections changed) raises `tenacity.TryAgain`, which
is retried whatever `retry_on` says and comes out of the last try as `TryAgain`.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import psycopg
import tenacity

from es_ray.config import RetryPolicy, RetrySettings, load_settings
from es_ray.logs import get_logger

log = get_logger("es_ray.retries")

# What each `retry_on` name retries. aborted_transaction: Postgres breaks a deadlock (or a serialisation
# conflict) by rolling one transaction back whole; it did nothing, so running it again is safe, whereas a
# constraint violation or a lost connection would only fail again or hide a bug.
RETRY_ON: dict[str, tuple[type[BaseException], ...]] = {
    "any_error": (Exception,),
    "aborted_transaction": (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure),
}


def wait_of(policy: RetryPolicy) -> tenacity.wait.wait_base:
    """The waits between tries: exponential doubles first_wait_s each time, linear adds it each time."""
    cap = {"max": policy.max_wait_s} if policy.max_wait_s is not None else {}
    if policy.wait == "exponential":
        return tenacity.wait_exponential(multiplier=policy.first_wait_s, exp_base=2, **cap)
    return tenacity.wait_incrementing(start=policy.first_wait_s, increment=policy.first_wait_s, **cap)


def retrying(policy: RetryPolicy, name: str, sleep: Callable[[float], None] = time.sleep) -> tenacity.Retrying:
    """A tenacity `Retrying` for `policy`; each retry is logged with `name` (what is tried again). `sleep`
    is there for tests, which record the waits instead of sleeping them."""

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("retry.waiting", policy=name, attempt=state.attempt_number, of=policy.attempts,
                    wait_s=round(state.upcoming_sleep, 3), error=f"{type(error).__name__}: {error}"[:500])

    return tenacity.Retrying(stop=tenacity.stop_after_attempt(policy.attempts), wait=wait_of(policy),
                             retry=tenacity.retry_if_exception_type(RETRY_ON[policy.retry_on]),
                             before_sleep=log_retry, reraise=True, sleep=sleep)


@functools.cache
def configured() -> RetrySettings:
    """The retry policies from configs/stack.yaml and the environment, read once per process, for code
    that is not handed the stack's settings (the dual write's callers, a fine-tune trial)."""
    return load_settings().retries
