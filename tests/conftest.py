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
import psutil
import pytest

from es_ray.client import EsRayClient
from es_ray.data import beir
from es_ray.stack.manifest import free_port
from es_ray.stack.processes import stack_ports
from tests.helpers import leftovers


def pytest_collection_modifyitems(config, items):
    # In this order, after the plain tests: generated (schemathesis) requests, which store junk sessions;
    # fault tests, which restart Postgres and kill Triton and the Serve replica; lifecycle tests, which
    # switch the blue model away from v1; the restart test, which stops and starts the shared stack.
    order = {"hostile": 1, "faults": 2, "lifecycle": 3, "restart": 4}
    items.sort(key=lambda item: max((rank for name, rank in order.items() if item.get_closest_marker(name)),
                                    default=0))


FAILED: list[str] = []


def pytest_runtest_logreport(report):
    if report.failed:
        FAILED.append(report.nodeid)


def _keep_logs(state_dir: Path) -> None:
    """After a failed test (or with ES_RAY_KEEP_TEST_LOGS=1), copies the stack's own logs out of the state
    dir (removed below) and shows the end of Triton's: a component that died mid-session says why only there."""
    keep = Path(tempfile.mkdtemp(prefix="esr-test-logs-", dir="/tmp"))
    for pattern in ("logs/*.log", "triton/*.log", "triton/servers/*/*.log", "postgres/log", "ray/session_latest/logs/*.log",
                    "ray/session_latest/logs/*.err", "ray/session_latest/logs/*.out",
                    "ray/session_latest/logs/serve/*.log"):
        for path in state_dir.glob(pattern):
            if path.stat().st_size > 50_000_000:
                continue
            target = keep / path.relative_to(state_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    triton_log = state_dir / "triton" / "tritonserver.log"
    tail = triton_log.read_text(errors="replace").splitlines()[-40:] if triton_log.exists() else []
    print(f"\n{len(FAILED)} test(s) failed; the stack's logs are kept in {keep}. Triton's log ends:")
    print("\n".join(tail))


def pytest_configure(config):
    config.addinivalue_line("markers", "hostile: generated requests that write junk sessions (after plain tests)")
    config.addinivalue_line("markers", "faults: restarts or kills parts of the stack under load (runs late)")
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
        "ES_RAY_REINDEX__RANGE_ITEMS": "30",
        "ES_RAY_TASKS__CHECK_INTERVAL_S": "2",
        "ES_RAY_LIFECYCLE__SWITCH_PAUSE_S": "4",
        "ES_RAY_LIFECYCLE__GRACE_S": "3600",
        # Ray ends a process whose GCS has been gone 60 s (exit 1, no pytest summary). The restart test
        # stops the head and may take longer than that to start it again: a Ray client left in this
        # process by an earlier test gets the time to reconnect.
        "RAY_gcs_rpc_server_reconnect_timeout_s": "300",
    })
    yield load_settings(state_dir)
    if FAILED or os.environ.get("ES_RAY_KEEP_TEST_LOGS"):  # =1 keeps them after a passing run too
        _keep_logs(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(settings):
    """The running stack's manifest (addresses of every component)."""
    from es_ray.stack import control

    before = {p.pid for p in psutil.process_iter()}
    try:
        manifest = control.up(settings)
    except BaseException:
        control.down(settings)  # what started before the failure must not outlive the session
        raise
    yield manifest
    control.down(settings)
    left = leftovers(settings.state_path, before, stack_ports(settings.state_path))
    assert not any(left.values()), f"the test session's stack left behind: {left}"


@pytest.fixture()
def scratch_database(stack):
    """Makes an empty database of its own on the stack's Postgres (`make(name)` -> its DSN), for tests that
    need the control tables to themselves; dropped at the end of the test."""
    from psycopg.conninfo import make_conninfo

    from es_ray.store import db

    made = []

    def make(name: str) -> str:
        with db.connect(stack.postgres_dsn) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            admin.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return make_conninfo(stack.postgres_dsn, dbname=name)

    yield make
    with db.connect(stack.postgres_dsn) as admin:
        for name in made:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def api(stack, settings):
    """A client with the stack's admin API key (made by `es-ray up`, see es_ray/stack/credentials.py)."""
    from es_ray.stack.credentials import local_api_key

    key = local_api_key(settings.state_path)
    assert key, "es-ray up made no local API key"
    with httpx.Client(base_url=stack.serve_url, headers={"X-API-Key": key}, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def client(stack):
    """The typed client (es_ray/client.py) with the stack's API key."""
    with EsRayClient.for_stack(stack) as client:
        yield client


@pytest.fixture(scope="session")
def anon(stack):
    """A client without credentials: what anyone on the network can do."""
    with httpx.Client(base_url=stack.serve_url, timeout=120) as client:
        yield client


# The collection the end-to-end tests search: SciFact where ../shared/data has it (the thresholds measured
# on it), else es-ray's own small collection (tests/fixtures/collection, written for the project), so that
# every test runs on a fresh clone too. ES_RAY_SHARED_DATA=/nonexistent shows the second case anywhere.
FIXTURE_COLLECTION = Path(__file__).resolve().parent / "fixtures" / "collection"
COLLECTION_DIR = beir.shared_dataset("scifact") or FIXTURE_COLLECTION


@pytest.fixture(scope="session")
def collection_dir() -> Path:
    """The BEIR directory of the collection (`collection_dir.name` says which: "scifact" or "collection")."""
    return COLLECTION_DIR


@pytest.fixture(scope="session")
def collection(collection_dir):
    """20 test queries, their relevant documents and random others: 200 documents of SciFact, or the whole
    of es-ray's own collection (which has fewer)."""
    return beir.sample(collection_dir, docs=200, queries=20, seed=7)


@pytest.fixture(scope="session")
def loaded_collection(api, collection):
    """The sample upserted over HTTP (in requests of 50 items)."""
    items, queries, qrels = collection
    for start in range(0, len(items), 50):
        response = api.put("/v1/items", json={"items": items[start:start + 50]})
        assert response.status_code == 200, response.text
        assert response.json() == {"upserted": len(items[start:start + 50]), "failed": []}
    LOADED_SAMPLE.update(item["id"] for item in items)
    return items, queries, qrels


LOADED_SAMPLE: set[str] = set()

PROBE_TOPICS = ["protein folding in cells", "immune response to infection", "gene expression in cancer",
                "vitamin deficiency and bone health", "antibiotic resistance in bacteria", "sleep and memory"]


@pytest.fixture(scope="module")
def probe_items(api):
    """A few short items to search and click, for tests that need results but not a real collection;
    deleted after the module, so tests that rank the loaded collection never meet them."""
    items = [{"id": f"probe-{n:02d}", "text": f"{PROBE_TOPICS[n % len(PROBE_TOPICS)]}, note {n}"} for n in range(24)]
    response = api.put("/v1/items", json={"items": items})
    assert response.status_code == 200 and not response.json()["failed"], response.text
    yield items
    api.request("DELETE", "/v1/items", json={"ids": [item["id"] for item in items]}).raise_for_status()


@pytest.fixture(scope="session")
def without_loaded_collection(api):
    """Deletes the loaded collection once the tests that search it have run (they all run before the
    lifecycle tests): every reindex re-embeds the whole collection, and SciFact's long abstracts would be
    most of that work."""
    if LOADED_SAMPLE:
        response = api.request("DELETE", "/v1/items", json={"ids": sorted(LOADED_SAMPLE)})
        assert response.status_code == 200, response.text
        LOADED_SAMPLE.clear()

