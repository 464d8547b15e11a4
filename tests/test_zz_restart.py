"""`es-ray status`, then `down` and `up` on the same state dir: data, registry and blue pointer survive."""

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from es_ray.inference import registry
from es_ray.stack import control, ray_head, triton
from es_ray.stack.processes import stack_ports
from tests.helpers import ids, leftovers, search


def es_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "es-ray"), *args], capture_output=True, text=True,
                          timeout=900)


def test_status_reports_every_component(stack, settings):
    result = es_ray("status", "--json", "--state-dir", str(settings.state_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ray"]["up"] and report["postgres"]["up"] and report["triton"]["up"] and report["mlflow"]["up"]
    assert report["serve"]["healthy"]
    assert report["blue"] == {"model_version": 1, "collection": "v1"}
    assert report["items"] >= 0


@pytest.mark.restart
def test_down_then_up_keeps_everything(stack, settings, api):
    items = [{"id": f"keep-{i}", "text": f"Durable item {i} about glaciers and ice sheets", "payload": {"i": i}}
             for i in range(5)]
    assert api.put("/v1/items", json={"items": items}).json()["upserted"] == 5
    # session=False: a recorded search may show one adjacent pair swapped (serve.swap_share)
    before = ids(search(api, "glaciers", limit=50, session=False))
    count_before = control.status(settings)["items"]
    blue_before = control.status(settings)["blue"]
    versions_before = registered_versions(settings)

    ports, pids_before = stack_ports(settings.state_path), {p.pid for p in psutil.process_iter()}
    result = es_ray("down", "--state-dir", str(settings.state_path))
    assert result.returncode == 0, result.stderr
    assert not ray_head.is_running(settings.state_path) and triton.running_pid(settings.state_path) is None
    assert triton.versions_running(settings.state_path) == []  # every version's tritonserver too
    assert control.status(settings)["postgres"]["up"] is False
    # Nothing of the stack is left in the process table (Ray Client's proxy, Triton's stubs, Postgres's
    # backends included) and nothing listens on its ports.
    assert leftovers(settings.state_path, pids_before, ports) == {"processes": [], "zombie_children": [], "listening": []}

    result = es_ray("up", "--state-dir", str(settings.state_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert stack.serve_url in result.stdout
    report = control.status(settings)
    assert report["items"] == count_before
    assert report["blue"] == blue_before   # v1, or the version the lifecycle tests switched to
    assert ids(search(api, "glaciers", limit=50, session=False)) == before
    assert registered_versions(settings) == versions_before  # the second up registered nothing new
    assert 1 in versions_before


def test_up_refuses_another_ingress_than_its_ray_head_was_started_for(stack, settings, api, monkeypatch):
    """The ingress is in the Ray head's environment: asking for another without `down` fails at once,
    saying what to do, and leaves the running replica alone."""
    replica = replica_pids()
    monkeypatch.setenv("ES_RAY_SERVE__INGRESS", "proxy" if settings.direct_ingress else "direct")
    result = es_ray("up", "--state-dir", str(settings.state_path))
    said = " ".join((result.stdout + result.stderr).split())  # the terminal may wrap the message
    assert result.returncode != 0 and "run `es-ray down`, then `es-ray up`" in said, said[-2000:]
    assert replica and replica_pids() == replica and api.get("/healthz").status_code == 200


def replica_pids() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "ServeReplica" in " ".join(p.info["cmdline"] or [])]


def registered_versions(settings) -> list[int]:
    versions = registry.client(registry.tracking_uri(settings)).search_model_versions(
        f"name = '{settings.mlflow.registered_model}'")
    return sorted(int(v.version) for v in versions)


@pytest.mark.restart
def test_up_again_leaves_an_unchanged_app_alone_and_redeploys_a_changed_one(stack, settings, api, monkeypatch):
    """`es-ray cycle` and the demo call `up` on a running stack: with the same settings and code the replica
    stays; new settings reach a new replica, also with direct ingress (where the old app goes first, since
    a rolling update cannot hand serve.port over), and the API answers afterwards."""
    replica = replica_pids()
    result = es_ray("up", "--state-dir", str(settings.state_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert replica and replica_pids() == replica

    def limit_refused(limit: int) -> bool:
        return api.post("/v1/search", json={"query": "glaciers", "limit": limit, "session": False}).status_code == 422

    assert limit_refused(settings.serve.max_limit + 1)
    try:
        with monkeypatch.context() as env:
            env.setenv("ES_RAY_SERVE__MAX_LIMIT", str(settings.serve.max_limit + 1))
            result = es_ray("up", "--state-dir", str(settings.state_path))
        assert result.returncode == 0, result.stderr[-3000:]
        assert replica_pids() and not set(replica_pids()) & set(replica)
        assert not limit_refused(settings.serve.max_limit + 1)     # the new replica has the new setting
    finally:
        result = es_ray("up", "--state-dir", str(settings.state_path))  # the session's settings again
    assert result.returncode == 0, result.stderr[-3000:]
    assert limit_refused(settings.serve.max_limit + 1)
