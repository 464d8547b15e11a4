"""The retry policies of configs/stack.yaml as tenacity runs them: how many tries, the waits between them
(recorded through tenacity's sleep hook, never slept) and which errors are tried again."""

from __future__ import annotations

import psycopg
import pydantic
import pytest
import tenacity
import yaml

from es_ray import retries
from es_ray.config import DEFAULT_CONFIG, RetryPolicy, RetrySettings, load_settings
from es_ray.data import dual_write

DEADLOCK = psycopg.errors.DeadlockDetected("deadlock detected")
SERIALISATION = psycopg.errors.SerializationFailure("could not serialize access")


@pytest.fixture(scope="module")
def configured() -> RetrySettings:
    """The `retries` section of configs/stack.yaml itself (no environment overrides)."""
    return RetrySettings.model_validate(yaml.safe_load(DEFAULT_CONFIG.read_text())["retries"])


def run(policy: RetryPolicy, errors: list[BaseException]) -> tuple[object, int, list[float]]:
    """Runs, under `policy`, a call that raises `errors` one per call and then returns "done". Returns
    (what came out: "done" or the exception raised, how many calls were made, the waits asked for)."""
    calls, waits = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return "done"

    try:
        outcome: object = retries.retrying(policy, "test", sleep=waits.append)(flaky)
    except BaseException as err:  # noqa: BLE001 - the test looks at what came out
        outcome = err
    return outcome, len(calls), waits


def test_mlflow_calls_are_tried_five_times_doubling_from_0_2_s(configured):
    outcome, calls, waits = run(configured.mlflow, [RuntimeError("database is locked")] * 4)
    assert (outcome, calls) == ("done", 5)
    assert waits == pytest.approx([0.2, 0.4, 0.8, 1.6])
    locked = RuntimeError("database is locked for good")
    outcome, calls, waits = run(configured.mlflow, [RuntimeError("locked")] * 4 + [locked])
    assert outcome is locked and calls == 5 and len(waits) == 4   # the last error itself, not a RetryError


def test_embed_rides_out_a_triton_restart_of_75_s_in_nine_tries(configured):
    errors = [ConnectionError("triton unavailable")] * 9
    outcome, calls, waits = run(configured.embed, errors)
    assert calls == 9 and outcome is errors[-1]                   # the caller records the items failed at "embed"
    assert waits == pytest.approx([1, 2, 4, 8, 15, 15, 15, 15])
    assert sum(waits) == pytest.approx(75)
    assert run(configured.embed, errors[:8])[:2] == ("done", 9)   # an answer on the last try is taken


@pytest.mark.parametrize("name, step", [("write", 0.05), ("reindex_write", 0.1)])
def test_writes_retry_only_a_transaction_postgres_rolled_back(configured, name, step):
    policy = getattr(configured, name)
    outcome, calls, waits = run(policy, [DEADLOCK, SERIALISATION, DEADLOCK, SERIALISATION])
    assert (outcome, calls) == ("done", 5)
    assert waits == pytest.approx([step, 2 * step, 3 * step, 4 * step])
    outcome, calls, waits = run(policy, [DEADLOCK] * 5)
    assert outcome is DEADLOCK and calls == 5
    # Anything else did (or may have done) part of its work, or would only fail again: raised at once.
    duplicate = psycopg.errors.UniqueViolation("duplicate key")
    assert run(policy, [duplicate]) == (duplicate, 1, [])
    assert run(policy, [ConnectionError("server closed the connection")])[1:] == (1, [])


def test_code_can_ask_for_another_try_whatever_retry_on_says(configured):
    outcome, calls, waits = run(configured.write, [tenacity.TryAgain()] * 2)
    assert (outcome, calls) == ("done", 3) and len(waits) == 2


def test_a_dual_write_that_never_completes_raises_lifecycle_moved(configured):
    no_wait = configured.write.model_copy(update={"first_wait_s": 0.0})
    calls = []

    def deadlocked() -> int:
        calls.append(1)
        raise DEADLOCK

    with pytest.raises(dual_write.LifecycleMoved, match="could not complete in 5 attempts"):
        dual_write._until_written("write", no_wait, deadlocked)
    assert len(calls) == 5

    def targets_keep_changing() -> int:
        calls.append(1)
        raise tenacity.TryAgain

    calls.clear()
    with pytest.raises(dual_write.LifecycleMoved, match="delete could not complete"):
        dual_write._until_written("delete", no_wait, targets_keep_changing)
    assert len(calls) == 5

    def broken() -> int:
        calls.append(1)
        raise psycopg.errors.UndefinedTable("relation does not exist")

    calls.clear()
    with pytest.raises(psycopg.errors.UndefinedTable):
        dual_write._until_written("write", no_wait, broken)
    assert len(calls) == 1


def test_a_policy_is_set_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv("ES_RAY_RETRIES__EMBED__ATTEMPTS", "3")
    monkeypatch.setenv("ES_RAY_RETRIES__EMBED__MAX_WAIT_S", "1.5")
    embed = load_settings().retries.embed
    outcome, calls, waits = run(embed, [TimeoutError("deadline exceeded")] * 3)
    assert isinstance(outcome, TimeoutError) and calls == 3 and waits == pytest.approx([1, 1.5])
    with pytest.raises(pydantic.ValidationError):
        RetryPolicy(attempts=3, wait="random", first_wait_s=1, retry_on="any_error")
    with pytest.raises(pydantic.ValidationError):
        RetryPolicy(attempts=0, wait="linear", first_wait_s=1, retry_on="any_error")
