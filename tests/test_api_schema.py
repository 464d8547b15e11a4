"""Schemathesis over the API's own OpenAPI document, against the running stack.

Requests are generated from the schema, valid ones and invalid ones; the run fails on any 5xx, any
status the document does not list, any body that breaks its documented schema, and invalid input that
is not refused. Bounded: a fixed seed and at most 30 generated examples per operation (plus the
schema's boundary values).

Operations that start real work (fine-tune, reindex, switch, rollback, abandoning green, improvement)
or delete by id get invalid data only; items the run upserts are deleted afterwards.
"""

from __future__ import annotations

import pytest
import schemathesis
from psycopg import sql
from schemathesis.checks import CHECKS, load_all_checks

from es_ray.serve.app import app
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection

pytestmark = pytest.mark.hostile

REJECTED = [400, 401, 403, 404, 405, 409, 413, 422]
NEGATIVE_ONLY = ["POST /v1/tasks/fine-tune", "POST /v1/tasks/reindex", "POST /v1/lifecycle/switch",
                 "POST /v1/lifecycle/cleanup", "POST /v1/lifecycle/abandon-green", "POST /v1/improvement/run",
                 "DELETE /v1/items"]
NOT_CALLED = ["POST /v1/lifecycle/rollback", "POST /v1/improvement/undo"]  # no input to make invalid

CONFIG = schemathesis.Config.from_dict({
    "request-timeout": 60,
    "suppress-health-check": ["all"],
    "seed": 20261127,
    # No unknown extra parameters: FastAPI ignores them, so "invalid" requests built that way are valid.
    "generation": {"max-examples": 30, "mode": "all", "database": "none", "allow-extra-parameters": False},
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
        "negative_data_rejection": {"enabled": True, "expected-statuses": REJECTED},
    },
    "operations": [
        *({"include-name": name, "generation": {"mode": "negative", "allow-extra-parameters": False},
           "phases": {"examples": {"enabled": False}}} for name in NEGATIVE_ONLY),
        *({"include-name": name, "enabled": False} for name in NOT_CALLED),
    ],
})
schema = schemathesis.openapi.from_dict(app.openapi(), config=CONFIG)
load_all_checks()


@pytest.fixture(scope="module")
def new_items_deleted(api, stack):
    """Deletes whatever items the generated upserts stored."""
    def ids() -> set[str]:
        with db.connect(stack.postgres_dsn) as conn:
            blue = blue_green.get_blue(conn)
            items = Collection(blue.collection, blue.dim).items
            return {r[0] for r in conn.execute(sql.SQL("SELECT object_id FROM {}").format(items))}
    before = ids()
    yield
    added = sorted(ids() - before)
    for start in range(0, len(added), 500):
        response = api.request("DELETE", "/v1/items", json={"ids": added[start:start + 500]})
        assert response.status_code == 200, response.text


def test_the_served_document_is_the_one_tested(anon):
    assert anon.get("/openapi.json").json()["paths"].keys() == app.openapi()["paths"].keys()


@schema.parametrize()
def test_generated_requests(case, api, new_items_deleted):
    case.call_and_validate(base_url=str(api.base_url).rstrip("/"), headers=dict(api.headers))


def test_schemathesis_checks_exist():
    """The check names in CONFIG are real ones (a typo would silently run nothing)."""
    for name in ("not_a_server_error", "status_code_conformance", "response_schema_conformance",
                 "negative_data_rejection"):
        assert CHECKS.get_one(name) is not None
