"""Faults under load: Postgres restarted, tritonserver killed, the Serve replica killed.

Clients keep searching and clicking through each fault (es_ray/bench/load.py, which `make load` runs at
8 clients). What users see must be a quick 503 with Retry-After (or, while the replica is replaced, no
answer), then recovery without restarting es-ray; and nothing acknowledged may be lost: every click
answered 200 is stored, and the others, sent again with the same event ids, are stored exactly once.
"""

from __future__ import annotations

import psycopg
import pytest

from es_ray.bench.load import Load, kill_replica, kill_triton, refusals, restart_postgres, settle_clicks, wait_for
from es_ray.client import EsRayClient
from es_ray.stack.credentials import local_api_key

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module", autouse=True)
def forget_load_sessions(stack):
    """Deletes the sessions these tests' clients recorded, once they are checked: hundreds of random
    clicks on a few probe items would otherwise be most of the click log that later fine-tunes learn
    their click model from."""
    with psycopg.connect(stack.postgres_dsn) as conn:
        started = conn.execute("SELECT now()").fetchone()[0]
    yield
    with psycopg.connect(stack.postgres_dsn) as conn:
        conn.execute("DELETE FROM sessions WHERE created_at >= %s", (started,))


def _assert_nothing_lost(stack, load: Load) -> dict:
    with EsRayClient.for_stack(stack) as client:
        clicks = settle_clicks(client, stack.postgres_dsn, load)
    assert clicks["acknowledged"] > 0, clicks
    assert clicks["lost"] == 0, clicks
    assert clicks["not_stored_once"] == 0, clicks
    assert clicks["resent_accepted"] + clicks["resent_duplicates"] == clicks["resent"], clicks
    return clicks


def _quick_503s(outcomes, since: float, fast_s: float) -> list:
    failed = refusals(outcomes, since)
    assert failed, "the fault was not seen by any request"
    assert {o.status for o in failed} == {503}, sorted({o.status for o in failed})
    assert all(o.retry_after for o in failed), "a 503 without Retry-After"
    slowest = max(o.seconds for o in failed)
    assert slowest < fast_s, f"a refusal took {slowest:.1f}s"
    return failed


def test_postgres_restart_under_load_answers_503_then_recovers(stack, settings, probe_items):
    with Load(stack.serve_url, think_s=0.05, api_key=local_api_key(stack.state_dir)) as load:
        wait_for(lambda: len(load.acked) >= 3, 60, "clicks before the fault")
        fault = restart_postgres(load, settings.state_path)
    # A request waits at most postgres.pool_timeout_s for a connection, so a refusal is never slow.
    _quick_503s(load.searches + load.clicks, fault["fault_at"], settings.postgres.pool_timeout_s + 5)
    _assert_nothing_lost(stack, load)


def test_killed_triton_is_restarted_and_searches_fail_fast_meanwhile(stack, settings, probe_items):
    with Load(stack.serve_url, think_s=0.05, api_key=local_api_key(stack.state_dir)) as load:
        wait_for(lambda: len(load.acked) >= 3, 60, "clicks before the fault")
        fault = kill_triton(load, settings.state_path)
    _quick_503s(load.searches, fault["fault_at"], fast_s=5)
    _assert_nothing_lost(stack, load)


def test_killed_serve_replica_is_replaced_and_no_acknowledged_click_is_lost(stack, probe_items):
    with Load(stack.serve_url, think_s=0.05, api_key=local_api_key(stack.state_dir)) as load:
        wait_for(lambda: len(load.acked) >= 5, 60, "clicks before the fault")
        fault = kill_replica(load, stack)
    # Requests the dead replica held fail (Ray Serve answers 500/503, or the connection drops); none
    # is a wrong answer, and the clicks below prove none that was acknowledged is lost.
    failed = refusals(load.searches + load.clicks, fault["fault_at"])
    assert {o.status for o in failed} <= {0, 500, 502, 503, 504}, sorted({o.status for o in failed})
    _assert_nothing_lost(stack, load)
