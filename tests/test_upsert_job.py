"""Bulk upsert as a Ray job (`ray job submit --working-dir . -- python -m es_ray.data.upsert`)."""

import json
import subprocess
import sys
import time
from pathlib import Path

from es_ray.data import beir
from es_ray.stack import ray_head
from es_ray.stack.jobs import REPO_ROOT
from es_ray.store import db
from tests.helpers import ids, search


def test_bulk_upsert_job_loads_a_beir_corpus_and_can_run_again(stack, collection_dir, settings, api):
    sampled, queries, _ = beir.sample(collection_dir, docs=60, queries=5, seed=99)
    # Ids of the job's own ("job-..."): the loaded collection may hold the same documents, and deleting
    # them at the end must not take them from the tests that search it.
    items = [{**item, "id": f"job-{item['id']}"} for item in sampled]
    corpus = Path(settings.state_path) / "job-corpus.jsonl"
    # the job reads the raw BEIR layout (_id, title, text, metadata), not es-ray items
    wanted = {i["id"] for i in items}
    with open(collection_dir / "corpus.jsonl") as source, open(corpus, "w") as out:
        for line in source:
            record = json.loads(line)
            if f"job-{record['_id']}" in wanted:
                out.write(json.dumps({**record, "_id": f"job-{record['_id']}"}) + "\n")
    command = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", stack.ray_dashboard_url,
               "--working-dir", str(REPO_ROOT), "--", "python", "-m", "es_ray.data.upsert", "--input", str(corpus)]
    env = {**ray_head.auth_environment(Path(stack.state_dir)), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    for attempt in range(2):  # the second run must replace, not duplicate
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert json.dumps({"upserted": len(items), "failed": []}) in result.stdout
    with db.connect(stack.postgres_dsn) as conn:
        stored = conn.execute("SELECT object_id, payload FROM items_v1 WHERE object_id = ANY(%s)",
                              (list(wanted),)).fetchall()
        averages = conn.execute("SELECT count(*) FROM parts_v1 WHERE is_average AND object_id = ANY(%s)",
                                (list(wanted),)).fetchone()[0]
    assert len(stored) == len(items) and averages == len(items)
    title = {i["id"]: i["payload"].get("title") for i in items}
    assert all(payload.get("title") == title[object_id] for object_id, payload in stored)
    one = items[0]
    assert one["id"] in ids(search(api, one["text"][:200], limit=5))
    api.request("DELETE", "/v1/items", json={"ids": sorted(wanted)})
    assert_ray_data_actors_stopped(stack, settings)


def assert_ray_data_actors_stopped(stack, settings):
    """The jobs made Ray Data's detached actors, and once no Ray Data work runs the lifecycle driver stops
    them (es_ray/data/ray_data_actors.py; the job wakes its housekeeping at its end)."""
    import ray
    from ray.util.state import list_actors

    from es_ray.data import ray_data_actors

    STATS = ray_data_actors.STATS_ACTOR[0]
    ray.init(address=stack.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    try:
        deadline = time.monotonic() + 60   # one housekeeping turn after the wake, with room for a second
        while ray_data_actors.present() and time.monotonic() < deadline:
            time.sleep(1)
        assert ray_data_actors.present() == []
        made = {a.name for a in list_actors(address=stack.ray_dashboard_url, limit=10_000,
                                            filters=[("state", "=", "DEAD")])}
        assert {name for name, _ in ray_data_actors.ACTORS} <= made   # they did exist, and were stopped
        # A Ray Data run of ours holds them: while its lock is held nobody stops them, even when no dataset
        # runs (this one has finished); once it is released they go.
        with ray_data_actors.in_use(stack.postgres_dsn):
            ray.data.range(8).materialize()
            deadline = time.monotonic() + 20   # the stats actor hears of the end a moment after it
            while ray_data_actors.running_datasets() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert ray_data_actors.running_datasets() == []
            assert ray_data_actors.stop_if_idle(stack.postgres_dsn) == []
            assert STATS in ray_data_actors.present()
        assert STATS in ray_data_actors.stop_if_idle(stack.postgres_dsn) or STATS not in ray_data_actors.present()
        assert STATS not in ray_data_actors.present()
        # Ray Train's trials make the coordinator alone (a fine-tune leaves no stats actor): stopped too.
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator)

        try:
            ray.get(get_or_create_autoscaling_coordinator().__ray_ready__.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            pass   # the driver's housekeeping stopped it while it started: what is checked below
        # []: the driver's housekeeping, which calls the same function, stopped it first
        assert ray_data_actors.stop_if_idle(stack.postgres_dsn) in (["AutoscalingCoordinator"], [])
        assert ray_data_actors.present() == []
    finally:
        ray.shutdown()


def test_job_refuses_a_missing_input(stack):
    result = subprocess.run([sys.executable, "-m", "es_ray.data.upsert", "--input", "/nonexistent.jsonl"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "does not exist" in result.stderr
