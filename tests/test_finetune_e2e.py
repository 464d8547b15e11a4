"""Fine-tuning on the real stack: POST /v1/tasks/fine-tune runs a Ray job (Tune over Train, MLflow),
registers a version, records the gate's decision; one fine-tune at a time; a killed job ends failed."""

import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from es_ray.inference import registry
from es_ray.stack import ray_head
from es_ray.stack.jobs import REPO_ROOT
from es_ray.store import db, blue_green, tasks
from tests.helpers import person, search

CLICKS = [0.81, 0.56, 0.46, 0.39, 0.29, 0.26, 0.24, 0.20, 0.20, 0.19]   # examination by rank
SMALL = {"data": {"min_heldout_queries": 2, "heldout_fraction": 0.25, "min_train_examples": 5},
         "train": {"max_steps": 4, "eval_every_steps": 2},
         "tune": {"num_samples": 2, "max_concurrent_trials": 2, "cpus_per_trial": 0.5},
         "space": {"epochs": {"choice": [1]}, "batch_size": {"choice": [16]}},
         "trial": {"epochs": 1, "batch_size": 16}}


@pytest.fixture(scope="module")
def clicked_sessions(api, loaded_collection):
    """Ten real search sessions per sample query, clicked by position-biased users: ten people, each from
    an address of its own (the fine-tune learns a pair once learning.min_clients distinct clients clicked it)."""
    _, queries, qrels = loaded_collection
    rng = random.Random(3)
    sessions = 0
    for n in range(10):
        with person(str(api.base_url), 2 + n) as user:
            for qid, text in queries.items():
                relevant = {d for d, g in qrels[qid].items() if g > 0}
                body = search(user, text, limit=10)
                clicked = [r["id"] for rank, r in enumerate(body["results"])
                           if rng.random() < CLICKS[rank] * (0.9 if r["id"] in relevant else 0.1)]
                if clicked:
                    events = [{"event_id": uuid.uuid4().hex, "item_id": i, "type": "click"} for i in clicked]
                    assert user.post(f"/v1/sessions/{body['session_id']}/events",
                                     json={"events": events}).status_code == 200
                sessions += 1
    return sessions


def wait_for(api, task_id, statuses, timeout_s=600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = api.get(f"/v1/tasks/{task_id}").json()
        if task["status"] in statuses:
            return task
        time.sleep(2)
    raise AssertionError(f"task {task_id} still {task['status']} after {timeout_s}s: {task}")


def test_fine_tune_task_registers_a_version_and_the_gate_refuses_a_worse_model(api, stack, settings,
                                                                                clicked_sessions):
    # A learning rate that wrecks the encoder: the new version must be registered but refused.
    wrecking = {**SMALL, "space": {**SMALL["space"], "learning_rate": {"loguniform": [0.05, 0.1]}},
                "trial": {**SMALL["trial"], "learning_rate": 0.07}}
    response = api.post("/v1/tasks/fine-tune", json={"config": wrecking})
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["kind"] == "fine-tune" and task["status"] in {"pending", "running"}

    second = api.post("/v1/tasks/fine-tune", json={"config": SMALL})
    assert second.status_code == 409 and "already running" in second.json()["error"]
    assert task["task_id"] in second.json()["error"]

    done = wait_for(api, task["task_id"], {"done", "failed"})
    assert done["status"] == "done", done["error"]
    result = done["result"]
    assert done["progress"]["trials_done"] == 2 and len(result["trials"]) == 2
    assert result["parent_version"] == 1 and result["candidate"] is False
    assert result["gate"]["new"] < result["gate"]["blue"] and "does not beat" in result["gate"]["reason"]
    assert result["data"]["sessions"] >= clicked_sessions and result["data"]["heldout_queries"] >= 2

    version = result["version"]
    client = registry.client(registry.tracking_uri(settings))
    tags = client.get_model_version(settings.mlflow.registered_model, str(version)).tags
    assert tags["es_ray.gate"] == "rejected" and tags["es_ray.parent_version"] == "1"
    assert tags["es_ray.split_seed"] == "13" and int(tags["es_ray.sessions"]) >= clicked_sessions
    with db.connect(stack.postgres_dsn) as conn:
        model = blue_green.get_model(conn, version)
        assert model.state == "rejected"
        row = conn.execute("SELECT parent_version, gate FROM models WHERE version = %s", (version,)).fetchone()
        assert row[0] == 1 and row[1]["candidate"] is False
        assert blue_green.get_blue(conn).model_version == 1          # a refused model is never deployed
    assert not (settings.state_path / "triton" / "models" / "query_encoder" / str(version)).exists()
    assert search(api, "still serving", session=False)["model"] == "v1"


def test_a_killed_fine_tune_job_ends_failed_with_the_reason(api, stack, clicked_sessions):
    slow = {**SMALL, "train": {"max_steps": 2000, "eval_every_steps": 50},
            "space": {**SMALL["space"], "epochs": {"choice": [50]}}, "trial": {**SMALL["trial"], "epochs": 50}}
    task = api.post("/v1/tasks/fine-tune", json={"config": slow}).json()
    wait_for(api, task["task_id"], {"running"}, timeout_s=300)
    deadline = time.monotonic() + 120
    while not api.get(f"/v1/tasks/{task['task_id']}").json()["progress"].get("trials_running"):
        assert time.monotonic() < deadline, "no trial started"
        time.sleep(1)
    drivers = [p for p in psutil.process_iter(["cmdline"])
               if "es_ray.train" in " ".join(p.info["cmdline"] or []) and task["task_id"] in " ".join(p.info["cmdline"])]
    assert drivers, "the job's driver process was not found"
    for process in drivers:
        process.kill()                                              # kill -9 of the job's driver

    failed = wait_for(api, task["task_id"], {"failed", "done"}, timeout_s=240)
    assert failed["status"] == "failed" and failed["finished_at"]
    assert "ended FAILED" in failed["error"] or "heartbeat" in failed["error"], failed["error"]
    with db.connect(stack.postgres_dsn) as conn:
        assert tasks.active_task(conn, "fine-tune") is None          # the next fine-tune may start


def test_fine_tune_requests_are_validated(api):
    bad = api.post("/v1/tasks/fine-tune", json={"config": {"tune": {"num_sample": 2}}})
    assert bad.status_code == 422 and "num_sample" in bad.json()["error"]
    assert api.post("/v1/tasks/fine-tune", json={"config": "fast"}).status_code == 422
    assert api.post("/v1/tasks/fine-tune", json={"config": {"space": {"scale": {"choice": []}}}}).status_code == 422
    missing = api.get("/v1/tasks/no-such-task")
    assert missing.status_code == 404 and "no-such-task" in missing.json()["error"]
    assert api.get("/v1/tasks", params={"limit": 0}).status_code == 422
    wrong_kind = api.get("/v1/tasks", params={"kind": "backup"})
    assert wrong_kind.status_code == 422 and "kind" in wrong_kind.json()["error"]


def test_tasks_are_listed_by_kind(api, stack):
    with db.connect(stack.postgres_dsn) as conn:
        ended = tasks.create(conn, tasks.CYCLE, {"by": "a test"}, status="running")
        tasks.fail(conn, ended.task_id, "ended by the test")
    for kind in tasks.KINDS:
        listed = api.get("/v1/tasks", params={"kind": kind, "limit": 50})
        assert listed.status_code == 200, listed.text
        assert all(task["kind"] == kind for task in listed.json()["tasks"])
        assert (ended.task_id in {task["task_id"] for task in listed.json()["tasks"]}) == (kind == tasks.CYCLE)


def test_ray_job_submit_entry_point_records_its_task_and_refuses_a_bad_config(stack):
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", stack.ray_dashboard_url,
               "--working-dir", str(REPO_ROOT), "--", "python", "-m", "es_ray.train", "--config",
               "configs/finetune.yaml", "--overrides", json.dumps({"tune": {"num_samples": 0}})]
    env = {**ray_head.auth_environment(Path(stack.state_dir)), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "invalid fine-tune config" in output and "num_samples" in output, output[-3000:]
    with db.connect(stack.postgres_dsn) as conn:
        task = tasks.recent(conn, "fine-tune", limit=1)[0]
    assert task.status == "failed" and "num_samples" in task.error
    assert task.params["submitted_by"] == "ray job" and task.job_id and task.job_id.startswith("raysubmit_")
