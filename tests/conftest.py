"""Shared fixtures: one real stack (Ray head, PostgreSQL + pgvector, Triton, MLflow, Serve) per session.

The stack lives in its own state dir under /tmp with free ports, so it never touches a developer's
`.es-ray/` stack or anything else on the machine, and is stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from es_ray.data import beir
from es_ray.stack.manifest import free_port

SCIFACT = beir.shared_dataset("scifact")


def pytest_collection_modifyitems(config, items):
    # Lifecycle tests switch the blue model: they run after the tests that expect v1. The restart
    # test stops and starts the shared stack: it runs after everything else.
    items.sort(key=lambda item: 2 if item.get_closest_marker("restart") else
               1 if item.get_closest_marker("lifecycle") else 0)


def pytest_configure(config):
    config.addinivalue_line("markers", "lifecycle: reindexes and switches the blue model (runs late)")
    config.addinivalue_line("markers", "restart: stops and restarts the shared stack (runs last)")


@pytest.fixture(scope="session")
def settings():
    from es_ray.config import load_settings

    state_dir = Path(tempfile.mkdtemp(prefix="esr-test-", dir="/tmp"))  # short: Ray's socket paths are limited
    os.environ.update({
        "ES_RAY_STATE_DIR": str(state_dir),
        "ES_RAY_SERVE__PORT": str(free_port()),
        "ES_RAY_RAY__DASHBOARD_PORT": "0",
        "ES_RAY_RAY__NUM_CPUS": "2",
        # Tests run improvement passes themselves (POST /v1/improvement/run) so they can count them;
        # the background loop's own behaviour is tested on its own.
        "ES_RAY_IMPROVE__ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        # Lifecycle tests: small reindex ranges (a killed reindex has something to resume), a dead job
        # noticed within seconds, a switch slow enough to kill the driver in the middle of it, and
        # cleanup only when a test asks for it.
        "ES_RAY_REINDEX__RANGE_ITEMS": "40",
        "ES_RAY_TASKS__CHECK_INTERVAL_S": "2",
        "ES_RAY_LIFECYCLE__SWITCH_PAUSE_S": "4",
        "ES_RAY_LIFECYCLE__GRACE_S": "3600",
        # Ray ends a process whose GCS has been gone 60 s (exit 1, no pytest summary). The restart test
        # stops the head and may take longer than that to start it again: a Ray client left in this
        # process by an earlier test gets the time to reconnect.
        "RAY_gcs_rpc_server_reconnect_timeout_s": "300",
    })
    yield load_settings(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(settings):
    """The running stack's manifest (addresses of every component)."""
    from es_ray.stack import control

    manifest = control.up(settings)
    yield manifest
    control.down(settings)


@pytest.fixture(scope="session")
def api(stack):
    with httpx.Client(base_url=stack.serve_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def scifact():
    if SCIFACT is None:
        pytest.skip("../shared/data/scifact is absent: this end-to-end test needs the SciFact collection")
    return SCIFACT


@pytest.fixture(scope="session")
def scifact_sample(scifact):
    """20 test queries, their relevant abstracts and random others: 200 documents."""
    return beir.sample(scifact, docs=200, queries=20, seed=7)


@pytest.fixture(scope="session")
def loaded_scifact(api, scifact_sample):
    """The sample upserted over HTTP (in requests of 50 items)."""
    items, queries, qrels = scifact_sample
    for start in range(0, len(items), 50):
        response = api.put("/v1/items", json={"items": items[start:start + 50]})
        assert response.status_code == 200, response.text
        assert response.json() == {"upserted": len(items[start:start + 50]), "failed": []}
    return items, queries, qrels

