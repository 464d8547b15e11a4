"""Blue/green on the real stack: reindex (a Ray Data job through Triton into pgvector), kills of its
driver and of a worker, a driver-actor kill mid-switch, rollback, and a reindex + switch under search
load with hundreds of concurrent upserts and deletes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import tritonclient.http

from es_ray.store.reindex_ranges import totals as range_totals
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import ITEM_ENCODER, QUERY_ENCODER, served_name
from es_ray.stack import ray_head, triton
from es_ray.stack.jobs import REPO_ROOT
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection, collection_name
from tests.helpers import click_as_people, person, register_variant

pytestmark = pytest.mark.lifecycle

TOPICS = ["glacier melt", "protein folding", "bridge design", "tax policy", "jazz history", "volcano ash",
          "bee colonies", "battery chemistry"]
PROBES = ["how do glaciers melt", "protein structure", "suspension bridges", "taxes on income", "jazz musicians",
          "volcanic eruptions", "honey bees", "lithium batteries"]


def wait_task(api, task_id, statuses, timeout_s=600, until=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = api.get(f"/v1/tasks/{task_id}").json()
        if task["status"] in statuses or (until and until(task)):
            return task
        time.sleep(0.5)
    raise AssertionError(f"task {task_id} still {task['status']} after {timeout_s}s: {task}")


def served_model(api, expected: str, timeout_s: float = 10.0) -> str:
    """The model search answers with, once replicas follow the blue pointer (they poll it every
    serve.blue_refresh_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        model = api.post("/v1/search", json={"query": "glacier"}).json()["model"]
        if model == expected or time.monotonic() > deadline:
            return model
        time.sleep(0.2)


def processes(marker: str, also: str = "") -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if marker in cmdline and also in cmdline:
            found.append(p)
    return found


def wait_ranges(stack, green: str, until, timeout_s: float = 300.0) -> tuple[int, int, int]:
    """(ranges, ranges done, items) of a reindex into `green` once until(ranges, done) holds."""
    deadline = time.monotonic() + timeout_s
    with db.connect(stack.postgres_dsn) as conn:
        while True:
            totals = range_totals(conn, green)
            if until(totals[0], totals[1]):
                return totals
            assert time.monotonic() < deadline, f"reindex ranges of {green} still {totals} after {timeout_s}s"
            time.sleep(0.05)


def encoder(stack, settings, target: blue_green.Target, name: str) -> TritonEncoder:
    return TritonEncoder.of(stack.triton_grpc_url, name, target, settings)


def targets(stack) -> blue_green.State:
    with db.connect(stack.postgres_dsn) as conn:
        return blue_green.get_state(conn)


def model_of(stack, version: int) -> blue_green.Target:
    with db.connect(stack.postgres_dsn) as conn:
        m = blue_green.get_model(conn, version)
    return blue_green.Target(m.version, f"v{m.version}", m.dim, m.source_dir, m.max_length, m.triton_grpc_url)


def assert_embedded_by(stack, settings, target: blue_green.Target, ids: list[str], texts: dict[str, str]):
    """Each item's first chunk vector in the target collection is the target model's embedding of its text."""
    with db.connect(stack.postgres_dsn) as conn:
        chunks = Collection(target.collection, target.dim).chunk_vectors(conn, ids)
    _, expected = encoder(stack, settings, target, ITEM_ENCODER).embed_chunks([texts[i] for i in ids],
                                                                             settings.model.chunk_overlap,
                                                                             settings.model.max_chunks)
    # Short texts: one chunk each, in order.
    for k, item_id in enumerate(ids):
        stored = dict(chunks[item_id])[1]
        assert float(stored @ expected[k]) > 0.999, (item_id, float(stored @ expected[k]))


@pytest.fixture(scope="module")
def lifecycle_items(api, without_loaded_collection):
    items = [{"id": f"lc-{i:04d}", "text": f"Note {i}: {TOPICS[i % len(TOPICS)]}, part {i // len(TOPICS)}",
              "payload": {"i": i}} for i in range(320)]
    response = api.put("/v1/items", json={"items": items})
    assert response.status_code == 200 and response.json()["failed"] == [], response.text
    return {i["id"]: i["text"] for i in items}


@pytest.fixture(scope="module")
def variant(settings, stack):
    return register_variant(settings, seed=11)


def test_reindex_requests_are_validated(api, stack):
    assert api.post("/v1/tasks/reindex", json={"to": 999}).status_code == 404
    assert api.post("/v1/tasks/reindex", json={"to": 0}).status_code == 422
    assert api.post("/v1/tasks/reindex", json={"to": 2, "switch": "maybe"}).status_code == 422
    blue = targets(stack).blue.model_version
    same = api.post("/v1/tasks/reindex", json={"to": blue})
    assert same.status_code == 409 and "already blue" in same.json()["error"]
    refused = api.post("/v1/lifecycle/switch", json={})
    assert refused.status_code == 409 and "no green" in refused.json()["error"]
    assert api.post("/v1/lifecycle/rollback").status_code == 409
    for path, body, field in (("/v1/tasks/reindex", {"to": 2, "hnsw": "sometimes"}, "hnsw"),
                              ("/v1/lifecycle/switch", {"force": 1}, "force"),
                              ("/v1/lifecycle/cleanup", {"now": "soon"}, "now"),
                              ("/v1/lifecycle/switch", {"forse": True}, "forse")):
        bad = api.post(path, json=body)
        assert bad.status_code == 422 and field in bad.json()["error"], (path, bad.text)


def test_reindex_resumes_after_its_driver_and_a_worker_are_killed(api, stack, settings, lifecycle_items, variant):
    # A user's click adjusts blue for that user; the reindex must re-derive it with the new model.
    body = api.post("/v1/search", json={"query": PROBES[0], "limit": 10, "user_id": "lc-user"}).json()
    click = {"event_id": f"{body['session_id']}-click", "item_id": body["results"][3]["id"], "type": "click"}
    assert api.post(f"/v1/sessions/{body['session_id']}/events", json={"events": [click]}).status_code == 200
    # Anonymous clicks (from learning.min_clients distinct clients) become a click memory on blue; the
    # reindex must derive it again for green.
    body = api.post("/v1/search", json={"query": PROBES[1], "limit": 10, "session": False}).json()
    remembered_id = body["results"][4]["id"]
    click_as_people(stack.serve_url, PROBES[1], remembered_id, people=3, limit=10)
    learned = api.post("/v1/improvement/run", params={"settle_s": 0}).json()
    assert learned["vectors_personal"] > 0 and learned["items_remembered"] >= 1

    before = targets(stack)
    task = api.post("/v1/tasks/reindex", json={"to": variant, "switch": "never"}).json()
    assert task["status"] == "pending", task
    # The kills are timed on the ranges table itself: the job's reported progress trails the ranges
    # Ray Data has already written, and a kill timed on it can come after the last one.
    green = collection_name(variant)
    total, _, _ = wait_ranges(stack, green, lambda total, done: total and done >= 2)
    assert total >= 8, total
    running = api.get(f"/v1/tasks/{task['task_id']}").json()
    assert running["status"] == "running", running

    drivers = processes("es_ray.lifecycle.reindex", task["task_id"])
    assert drivers, "the reindex job's driver process was not found"
    workers = processes("ReindexWorker")
    assert workers, "no Ray Data worker of the reindex was found"
    random.Random(5).choice(workers).kill()                      # kill -9 of a Ray Data worker
    _, done_then, _ = wait_ranges(stack, green, lambda total, done: True)
    wait_ranges(stack, green, lambda total, done: done > done_then)  # ... and the job goes on without it
    for process in drivers:
        process.kill()                                           # kill -9 of the job's driver
    failed = wait_task(api, task["task_id"], {"failed", "done"}, timeout_s=120)
    assert failed["status"] == "failed" and "ended FAILED" in failed["error"], failed
    ranges = api.get("/v1/lifecycle").json()["green"]["reindex_ranges"]
    assert 0 < ranges["done"] < ranges["total"], ranges        # killed half-way
    assert api.get("/v1/lifecycle").json()["locks"] == []      # the dead job's lock was released

    # Started again with `ray job submit`: it resumes from the ranges already done.
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", stack.ray_dashboard_url,
               "--working-dir", str(REPO_ROOT), "--", "python", "-m", "es_ray.lifecycle.reindex", "--to", str(variant),
               "--switch", "never", "--namespace", settings.ray.namespace]
    env = {**ray_head.auth_environment(Path(stack.state_dir)), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    with db.connect(stack.postgres_dsn) as conn:
        from es_ray.store import tasks
        rerun = tasks.recent(conn, "reindex", limit=1)[0]
    assert rerun.status == "done", rerun
    assert rerun.result["resumed_from_ranges"] >= ranges["done"], rerun.result
    assert rerun.result["ranges_this_run"] == total - rerun.result["resumed_from_ranges"]
    assert rerun.result["adjustments"]["mode"] == "rederive" and rerun.result["adjustments"]["user_sessions"] >= 1
    assert rerun.result["item_vectors"].startswith("embedded")   # the variant's item tower is another one
    assert rerun.result["adjustments"]["items_remembered"] >= 1
    with db.connect(stack.postgres_dsn) as conn:
        remembered = conn.execute(f"SELECT count(*) FROM parts_v{variant} WHERE object_id = %s AND original IS NOT NULL",
                                  (remembered_id,)).fetchone()[0]
    assert remembered >= 1                                       # green carries the memory, with the new model

    state = targets(stack)
    assert state.blue == before.blue and state.green.model_version == variant   # not switched: switch=never
    blue = Collection(state.blue.collection, state.blue.dim)
    green = Collection(state.green.collection, state.green.dim)
    with db.connect(stack.postgres_dsn) as conn:
        assert blue.differences(conn, green) == {"missing": 0, "extra": 0, "missing_ids": [], "extra_ids": []}
        assert green.count(conn) == blue.count(conn) == rerun.result["items"]
        averages = conn.execute(f"SELECT count(*), count(DISTINCT object_id) FROM parts_{green.name} "
                                "WHERE is_average").fetchone()
        assert averages == (green.count(conn), green.count(conn))   # one vector set per item: no duplicates
        personal = conn.execute(f"SELECT count(*) FROM user_parts_{green.name} WHERE user_id = 'lc-user'").fetchone()
        assert personal[0] > 0                                      # re-derived in the new model's space
    sample = sorted(random.Random(1).sample(sorted(lifecycle_items), 40))
    assert_embedded_by(stack, settings, state.green, sample, lifecycle_items)      # the new model's vectors
    with pytest.raises(AssertionError):                          # ... and not the old model's
        assert_embedded_by(stack, settings, dataclasses.replace(state.blue, collection=state.green.collection),
                           sample[:5], lifecycle_items)


def test_a_driver_killed_mid_switch_finishes_it_once(api, stack, settings, variant):
    before = api.get("/v1/lifecycle").json()
    assert before["green"]["state"] == "ready" and before["green"]["model_version"] == variant
    answers = []
    caller = threading.Thread(target=lambda: answers.append(api.post("/v1/lifecycle/switch", json={"force": True})))
    caller.start()
    deadline = time.monotonic() + 30
    while True:                                                  # the switch is recorded, not yet made
        with db.connect(stack.postgres_dsn) as conn:
            started = blue_green.unfinished_switches(conn)
        if started:
            break
        assert time.monotonic() < deadline, "the switch was never recorded"
        time.sleep(0.1)
    from ray.util.state import list_actors

    drivers = list_actors(address=stack.ray_dashboard_url, filters=[("class_name", "=", "LifecycleDriver"),
                                                                     ("state", "=", "ALIVE")])
    assert len(drivers) == 1, drivers
    psutil.Process(drivers[0].pid).send_signal(signal.SIGKILL)  # the driver actor dies mid-switch
    caller.join(timeout=120)
    # Ray retried the call on the restarted driver: it answers with the switch the first call recorded
    # (the route's idempotency key), not a second switch nor a refusal.
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert answers[0].json()["switch_id"] == started[0].switch_id

    deadline = time.monotonic() + 180
    while True:                                                  # Ray restarts it; it finishes the switch
        state = api.get("/v1/lifecycle")
        if state.status_code == 200 and state.json()["blue"]["model_version"] == variant:
            break
        assert time.monotonic() < deadline, state.text
        time.sleep(1)
    after = state.json()
    assert after["epoch"] == before["epoch"] + 1                 # switched exactly once
    assert after["previous"]["model_version"] == before["blue"]["model_version"] and after["green"] is None
    with db.connect(stack.postgres_dsn) as conn:
        record = blue_green.get_switch(conn, started[0].switch_id)
        assert record.status == "switched"
        assert blue_green.unfinished_switches(conn) == []
    assert served_model(api, f"v{variant}") == f"v{variant}"
    again = api.post("/v1/lifecycle/switch", json={"force": True})
    assert again.status_code == 409 and "no green" in again.json()["error"]

    # Rollback within the grace period: the old blue serves again, and it kept receiving writes.
    put = api.put("/v1/items", json={"items": [{"id": "lc-after-switch", "text": "written after the switch"}]})
    assert put.status_code == 200 and put.json()["upserted"] == 1, put.text
    with db.connect(stack.postgres_dsn) as conn:
        for name in (f"v{variant}", before["blue"]["collection"]):
            assert "lc-after-switch" in Collection(name, 384).get(conn, ["lc-after-switch"]), name
    rolled = api.post("/v1/lifecycle/rollback")
    assert rolled.status_code == 200 and rolled.json()["status"] == "switched", rolled.text
    assert api.get("/v1/lifecycle").json()["epoch"] == before["epoch"] + 2
    served_model(api, f"v{before['blue']['model_version']}")
    search = api.post("/v1/search", json={"query": "written after the switch", "limit": 3, "session": False}).json()
    assert search["model"] == f"v{before['blue']['model_version']}" and search["results"][0]["id"] == "lc-after-switch"


def test_reindex_and_switch_under_search_load_and_concurrent_writes(api, stack, settings, lifecycle_items):
    new_version = register_variant(settings, seed=12)
    churn = [f"churn-{i:03d}" for i in range(80)]
    assert api.put("/v1/items", json={"items": [{"id": i, "text": f"{i} initial text", "payload": {"rev": 0}}
                                                for i in churn]}).status_code == 200
    stop = threading.Event()
    failures, responses = [], []
    last_op: dict[str, tuple[str, str | None]] = {}              # id -> ("upsert", text) or ("delete", None)

    def searcher(seed: int) -> None:
        rng = random.Random(seed)
        with api.__class__(base_url=stack.serve_url, headers=api.headers, timeout=60) as client:
            while not stop.is_set():
                query = rng.choice(PROBES)
                r = client.post("/v1/search", json={"query": query, "limit": 10})
                if r.status_code != 200:
                    failures.append(("search", r.status_code, r.text[:300]))
                else:
                    responses.append((query, r.json()))

    def writer(ids: list[str], seed: int) -> None:
        rng = random.Random(seed)
        rev = 0
        with api.__class__(base_url=stack.serve_url, headers=api.headers, timeout=60) as client:
            while not stop.is_set():
                rev += 1
                chosen = rng.sample(ids, rng.randint(1, 4))
                if rng.random() < 0.35:
                    r = client.request("DELETE", "/v1/items", json={"ids": chosen})
                    ops = {i: ("delete", None) for i in chosen}
                else:
                    texts = {i: f"{i} revision {rev} about {rng.choice(TOPICS)}" for i in chosen}
                    r = client.put("/v1/items", json={"items": [{"id": i, "text": t, "payload": {"rev": rev}}
                                                                for i, t in texts.items()]})
                    ops = {i: ("upsert", t) for i, t in texts.items()}
                if r.status_code != 200 or (r.request.method == "PUT" and r.json()["failed"]):
                    failures.append(("write", r.status_code, r.text[:300]))
                else:
                    last_op.update(ops)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    threads += [threading.Thread(target=writer, args=(churn[k::2], 100 + k)) for k in range(2)]
    for t in threads:
        t.start()
    try:
        task = api.post("/v1/tasks/reindex", json={"to": new_version, "switch": "force"}).json()
        done = wait_task(api, task["task_id"], {"failed", "done"}, timeout_s=900)
        assert done["status"] == "done", (done["error"], done["progress"])
        assert done["result"]["switch"]["status"] == "switched", done["result"]
        time.sleep(3)                                            # load goes on after the switch
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)

    writes = sum(1 for _ in last_op)
    assert failures == [], failures[:5]                          # zero failed requests
    assert len(responses) > 50 and writes == len(churn)
    models = {r["model"] for _, r in responses}
    state = targets(stack)
    assert state.blue.model_version == new_version and models <= {f"v{state.previous.model_version}",
                                                                   f"v{new_version}"}
    assert f"v{new_version}" in models and len(models) == 2, models   # both served during the test

    # Never a mix inside one response: every score is that model's query against that model's collection.
    by_model = {f"v{t.model_version}": t for t in (state.blue, state.previous)}
    query_vectors = {(m, q): encoder(stack, settings, t, QUERY_ENCODER).embed_queries([q])[0]
                     for m, t in by_model.items() for q in PROBES}
    with db.connect(stack.postgres_dsn) as conn:
        chunks = {m: Collection(t.collection, t.dim).chunk_vectors(conn, sorted(lifecycle_items))
                  for m, t in by_model.items()}
    checked = 0
    for query, response in responses:
        for hit in response["results"]:
            if hit["id"] in chunks[response["model"]]:
                expected = max(float(v @ query_vectors[(response["model"], query)])
                               for _, v in chunks[response["model"]][hit["id"]])
                assert abs(hit["score"] - expected) < 1e-3, (response["model"], query, hit)
                checked += 1
    assert checked > 100

    # The final state is exactly what the writers last did, in blue and in the previous collection.
    with db.connect(stack.postgres_dsn) as conn:
        for target in (state.blue, state.previous):
            stored = Collection(target.collection, target.dim).get(conn, churn)
            for item_id, (op, text) in last_op.items():
                if op == "delete":
                    assert item_id not in stored, (target.collection, item_id)
                else:
                    assert stored[item_id]["text_sha256"] == hashlib.sha256(text.encode()).hexdigest(), item_id
        blue = Collection(state.blue.collection, state.blue.dim)
        assert blue.differences(conn, Collection(state.previous.collection, state.previous.dim))["missing"] == 0
    alive = sorted(i for i, (op, _) in last_op.items() if op == "upsert")
    assert alive, "the writers deleted everything"
    assert_embedded_by(stack, settings, state.blue, alive[:10], {i: last_op[i][1] for i in alive})
    # The lexical index of the new blue (built by the reindex, kept by the dual writes): an item's id, a
    # word of its text ('churn-012', also its parts 'churn' and '012'), finds a live item first, a deleted
    # one no longer.
    for item_id, (op, _) in last_op.items():
        found = [r["id"] for r in api.post("/v1/search", json={"query": item_id, "mode": "lexical", "limit": 3,
                                                               "session": False}).json()["results"]]
        assert (found[:1] == [item_id]) if op == "upsert" else (item_id not in found), (item_id, op, found)

    # Cleanup drops the previous collection and unloads its model; blue serves on.
    cleaned = api.post("/v1/lifecycle/cleanup", json={"now": True})
    deadline = time.monotonic() + 30
    while cleaned.json().get("dropped") is None and time.monotonic() < deadline:
        time.sleep(2)                                            # cleanup waits a few seconds after a switch
        cleaned = api.post("/v1/lifecycle/cleanup", json={"now": True})
    assert cleaned.json()["dropped"]["collection"] == state.previous.collection, cleaned.text
    with db.connect(stack.postgres_dsn) as conn:                 # its lexical index went with it
        indexes = [conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"items_{t.collection}_lexical",)).fetchone()[0]
                   for t in (state.blue, state.previous)]
    assert indexes == [True, False]
    after = api.get("/v1/lifecycle").json()
    assert after["previous"] is None and after["blue"]["model_version"] == new_version
    assert api.post("/v1/search", json={"query": "honey bees"}).json()["model"] == f"v{new_version}"
    dropped = [m for m in after["models"] if m["version"] == state.previous.model_version][0]
    assert dropped["state"] == "retired"
    old_model = served_name(ITEM_ENCODER, state.previous.model_version)
    assert triton.running_pid(settings.state_path, state.previous.model_version) is None  # its server stopped
    assert not (Path(settings.state_path) / "triton" / "models" / old_model).exists()   # and its files gone
    new_server = tritonclient.http.InferenceServerClient(triton.version_address(settings.state_path, new_version)["http"])
    assert new_server.is_model_ready(served_name(ITEM_ENCODER, new_version), str(new_version))
    assert json.loads(json.dumps(after))                         # the whole answer is JSON


def test_es_ray_cycle_runs_every_step_once(api, stack, settings, lifecycle_items):
    """`es-ray cycle`: fine-tune -> gate -> deploy -> reindex -> switch -> cleanup, as one Ray job."""
    rng = random.Random(9)
    examination = [0.8, 0.55, 0.45, 0.38, 0.3, 0.26, 0.24, 0.2, 0.2, 0.19]
    # Clicks, the fine-tune's training data, from 8 people of their own addresses: a pair teaches the
    # fine-tune once learning.min_clients distinct clients clicked it.
    for n in range(40, 48):
        with person(stack.serve_url, n) as someone:
            for topic, query in enumerate(PROBES):
                body = someone.post("/v1/search", json={"query": query, "limit": 10}).json()
                clicked = [r["id"] for rank, r in enumerate(body["results"]) if r["id"].startswith("lc-") and
                           rng.random() < examination[rank] * (0.9 if int(r["id"][3:]) % len(TOPICS) == topic else 0.1)]
                if clicked and body["session_id"]:
                    events = [{"event_id": f"e-{i}", "item_id": i, "type": "click"} for i in clicked]
                    assert someone.post(f"/v1/sessions/{body['session_id']}/events",
                                        json={"events": events}).status_code == 200
    before = api.get("/v1/lifecycle").json()
    # Every click one example (no click model): this test is about the cycle's steps, and the shared
    # stack's click log (other tests' sessions, on items deleted since) must not decide its data.
    small = {"data": {"min_heldout_queries": 2, "heldout_fraction": 0.25, "min_train_examples": 5},
             "debias": {"enabled": False},
             "train": {"max_steps": 2, "eval_every_steps": 2},
             "tune": {"num_samples": 1, "max_concurrent_trials": 1, "cpus_per_trial": 0.5},
             "space": {"epochs": {"choice": [1]}, "batch_size": {"choice": [16]}},
             "trial": {"epochs": 1, "batch_size": 16}}
    command = [str(Path(sys.executable).parent / "es-ray"), "cycle", "--state-dir", str(settings.state_path),
               "--overrides", json.dumps(small), "--force", "--cleanup-now"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    after = api.get("/v1/lifecycle").json()
    cycle = [t for t in after["tasks"] if t["kind"] == "cycle"][0]
    assert cycle["status"] == "done", cycle
    steps = {s["step"]: s for s in cycle["result"]["steps"]}
    assert list(steps) == ["fine-tune", "gate", "deploy", "reindex", "switch", "cleanup"]
    assert all(s["status"] in ("done", "passed", "overridden (--force)") for s in steps.values()), steps
    version = cycle["result"]["version"]
    assert after["blue"]["model_version"] == version and after["epoch"] == before["epoch"] + 1
    assert after["previous"] is None and after["green"] is None          # cleaned up at once (--cleanup-now)
    assert steps["cleanup"]["dropped"]["collection"] == before["blue"]["collection"]
    assert served_model(api, f"v{version}") == f"v{version}"
    assert after["blue"]["items"] == before["blue"]["items"]
    with db.connect(stack.postgres_dsn) as conn:
        from es_ray.store import tasks
        reindex = tasks.recent(conn, "reindex", limit=1)[0]
    # Only the query tower was fine-tuned: the reindex copied blue's item vectors, no forward pass.
    assert reindex.result["item_vectors"].startswith("copied"), reindex.result
