"""More than one machine, on one: a second Ray node joins the session's cluster and a reindex spreads
its key ranges over both nodes (Serve, Postgres, Triton and MLflow stay where they are, as external
services would).

The second node is a `ray start --block` of our own; it is stopped by ending that process and what it
started, never with `ray stop` (which would stop every Ray process on the machine).
"""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

import psutil
import pytest

from es_ray.stack import ray_head
from es_ray.stack.manifest import free_port
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection
from tests.helpers import register_variant

pytestmark = pytest.mark.lifecycle

RANGES_AT_LEAST = 4  # so that both of the pool's actors get work (conftest: 40 items a range)


def alive_nodes(stack) -> list:
    from ray.util.state import list_nodes

    # The dashboard wants the head's token: control.up put it into this process's environment.
    # Filtered on this side: with a server-side filter, Ray 2.60 counts the dead nodes left out as
    # truncated output and raises.
    return [n for n in list_nodes(address=stack.ray_dashboard_url, limit=1000) if n.state == "ALIVE"]


def wait_for(what: str, check, timeout_s: float, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        time.sleep(interval_s)


@contextmanager
def second_node(stack, settings, num_cpus: int = 1):
    """A Ray worker node on this machine joined to the session's head; yields its `ray start` process."""
    temp = settings.state_path / "ray2"  # under the state dir: the session's teardown would find leftovers
    temp.mkdir(exist_ok=True)
    env = ray_head.environment(settings.state_path)  # with the head's token
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain (no Serve replica): stop at once
    # A loopback head (the default) listens on loopback only, and `ray start` would turn the loopback
    # addresses below into the machine's own; a worker node refuses Ray's single-machine mode, which keeps
    # them. So this node starts through `ray start`'s own entry point with loopback addresses kept as
    # given, as Ray's cluster_utils runs several nodes on 127.0.0.1. (A real second machine joins a head
    # configured with a reachable ray.node_ip_address, where nothing is rewritten.)
    for name in ray_head.SINGLE_MACHINE:
        env.pop(name, None)
    keep_loopback = ("from ray._private import services; services.resolve_ip_for_localhost = lambda host: host; "
                     "from ray.scripts.scripts import main; main()")
    command = [sys.executable, "-c", keep_loopback, "start", "--block", f"--address={stack.ray_address}",
               f"--node-ip-address={settings.ray.node_ip_address}", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--object-store-memory={200 * 1024 ** 2}", f"--dashboard-agent-listen-port={free_port()}",
               f"--temp-dir={temp}", "--disable-usage-stats"]
    with open(temp / "ray-start.log", "w") as log:
        # Its own session (process group): what it starts can be told apart from everything else.
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_node(process)


def stop_node(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops its raylet, agents and workers), then anything of its
    process tree still alive."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(family, timeout=5)
    for leftover in alive:
        try:
            leftover.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


def finished_task(api, task_id: str) -> dict | None:
    task = api.get(f"/v1/tasks/{task_id}").json()
    return task if task["status"] in ("done", "failed") else None


def two_alive_nodes(stack) -> list | None:
    nodes = alive_nodes(stack)
    return nodes if len(nodes) == 2 else None


def test_reindex_spreads_its_ranges_over_two_nodes(api, stack, settings, without_loaded_collection):
    with db.connect(stack.postgres_dsn) as conn:
        blue = blue_green.get_state(conn).blue
        count = Collection(blue.collection, blue.dim).count(conn)
    needed = RANGES_AT_LEAST * settings.reindex.range_items - count
    if needed > 0:  # run on its own, blue may hold little: short texts embed fast
        items = [{"id": f"mn-{i:04d}", "text": f"Multi-node note {i} about glaciers, bees or batteries"}
                 for i in range(needed)]
        response = api.put("/v1/items", json={"items": items})
        assert response.status_code == 200 and response.json()["failed"] == [], response.text

    head = alive_nodes(stack)
    assert len(head) == 1 and head[0].is_head_node, head           # the cluster as the session made it
    head_id = head[0].node_id
    with second_node(stack, settings) as node:
        version = register_variant(settings, seed=13)             # while the node starts
        nodes = wait_for("a second alive Ray node", lambda: two_alive_nodes(stack), timeout_s=120)
        assert node.poll() is None, (settings.state_path / "ray2" / "ray-start.log").read_text()[-3000:]
        worker_id = next(n.node_id for n in nodes if n.node_id != head_id)

        task = api.post("/v1/tasks/reindex", json={"to": version, "switch": "force"}).json()
        done = wait_for(f"reindex {task['task_id']}", lambda: finished_task(api, task["task_id"]), 600, 1)
        assert done["status"] == "done", (done["error"], done["progress"])

    # The second node is gone: its processes ended and the cluster is back to the head alone.
    assert node.returncode is not None
    wait_for("the second node marked dead", lambda: [n.node_id for n in alive_nodes(stack)] == [head_id], 60)
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if any(str(settings.state_path / "ray2") in part for part in p.info["cmdline"] or [])]
    assert leftovers == [], leftovers

    result = done["result"]
    assert set(result["nodes"]) == {head_id, worker_id}, result["nodes"]   # ranges ran on both nodes
    assert all(n >= 1 for n in result["nodes"].values())
    assert sum(result["nodes"].values()) == result["ranges"] == result["ranges_this_run"] >= RANGES_AT_LEAST
    assert result["switch"]["status"] == "switched", result["switch"]

    # Green was complete (exactly blue's items) and is blue now; the old blue is the previous one.
    with db.connect(stack.postgres_dsn) as conn:
        state = blue_green.get_state(conn)
        assert state.blue.model_version == version and state.previous.model_version == blue.model_version
        new, old = Collection(state.blue.collection, state.blue.dim), Collection(blue.collection, blue.dim)
        assert new.differences(conn, old) == {"missing": 0, "extra": 0, "missing_ids": [], "extra_ids": []}
        assert new.count(conn) == result["items"]

    # Leave no dual writes behind for later tests: drop the previous collection now.
    cleaned = api.post("/v1/lifecycle/cleanup", json={"now": True})
    deadline = time.monotonic() + 30
    while cleaned.json().get("dropped") is None and time.monotonic() < deadline:
        time.sleep(2)                                             # cleanup waits a few seconds after a switch
        cleaned = api.post("/v1/lifecycle/cleanup", json={"now": True})
    assert cleaned.json()["dropped"]["collection"] == blue.collection, cleaned.text
    after = api.get("/v1/lifecycle").json()
    assert after["green"] is None and after["previous"] is None and after["blue"]["model_version"] == version
