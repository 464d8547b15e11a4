"""Every process of one state dir's stack, found in the process table, and what each one does.

`es-ray up` starts processes that outlive it (Ray's head and workers, PostgreSQL, the Triton supervisor),
so "the stack" is whatever the process table says belongs to the state dir: a command line that names it
(Ray's temp dir, Postgres's data dir, Triton's repository and supervisor), or an environment whose
RAY_TMPDIR is its Ray temp dir (Ray's processes inherit it from `ray start`, Ray Client's proxy too,
whose command line names the head only by address), and every descendant of those (Ray's workers,
Postgres's backends, Triton's python-backend stubs). The idle benchmark measures them; the test
session and `es-ray down` check that none is left.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import psutil


def stack_processes(state_dir: Path) -> list[psutil.Process]:
    """The live processes of the stack of `state_dir` (zombies included: a zombie is a leftover too),
    never this process or its ancestors (a command that names the state dir on its own command line)."""
    state = str(Path(state_dir).expanduser().resolve())
    names_state = re.compile(re.escape(state) + r"(?=$|[/\s,:;])")
    ray_tmp = str(Path(state) / "ray")
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    roots = []
    for process in psutil.process_iter(["pid", "cmdline", "environ"]):
        if process.pid in own:
            continue
        try:
            words = process.info["cmdline"] or []
            env = process.info["environ"] or {}
        except psutil.Error:
            continue
        if names_state.search(" ".join(words)) or env.get("RAY_TMPDIR") == ray_tmp:
            roots.append(process)
    found = {p.pid: p for p in roots}
    for root in roots:
        try:
            found.update({child.pid: child for child in root.children(recursive=True) if child.pid not in own})
        except psutil.Error:
            continue
    return list(found.values())


# What each process does, by the first match in its command line (Ray workers set theirs to `ray::<actor>`).
ROLES: list[tuple[str, str]] = [
    ("triton_python_backend_stub", "Triton python-backend stub: runs one model instance (ONNX Runtime or torch), fed by tritonserver "
                                   "through shared memory"),
    ("tritonserver", "Triton Inference Server: HTTP/gRPC inference, dynamic batching, model control"),
    ("es_ray.stack.supervisor", "es-ray's Triton supervisor: restarts tritonserver when it dies"),
    ("gcs_server", "Ray GCS: the cluster's tables (nodes, actors, jobs, placement groups), health checks of nodes"),
    ("raylet", "Ray raylet: schedules tasks and actors, starts workers, holds the object store"),
    ("dashboard/agent.py", "Ray dashboard agent: this node's metrics (psutil scans of every worker), job agent, "
                           "the Prometheus endpoint"),
    ("runtime_env/agent", "Ray runtime-env agent: prepares jobs' environments"),
    ("dashboard/dashboard.py", "Ray dashboard head: the job API (job submission), state API, metrics"),
    ("log_monitor.py", "Ray log monitor: tails workers' logs for drivers (off unless ray.log_monitor)"),
    ("autoscaler/_private/monitor.py", "Ray autoscaler monitor (its loop also reports the cluster's status)"),
    ("ray.util.client.server", "Ray Client proxy (ray:// connections)"),
    ("ray::ServeController", "Serve controller: reconciles deployments, health-checks replicas and proxies"),
    ("ray::ProxyActor", "Serve HTTP proxy (uvicorn): routes requests to replicas"),
    ("ray::ServeReplica", "Serve replica: es-ray's HTTP API (search, clicks, items), follows the blue pointer"),
    ("ray::LifecycleDriver", "lifecycle driver: Triton reconcile, task watch, cleanup, retention, improvement loop"),
    ("ray::DashboardAgent", "Ray dashboard agent: this node's metrics (psutil scans of every worker), job agent, "
                            "the Prometheus endpoint"),
    ("ray::RuntimeEnvAgent", "Ray runtime-env agent: prepares jobs' environments"),
    ("ray-dashboard-", "a module of Ray's dashboard head, in a process of its own (jobs, state, metrics, ...)"),
    ("ray::JobSupervisor", "Ray job supervisor: runs one submitted job's entrypoint"),
    ("ray::IDLE", "idle Ray worker, kept for the next task"),
    ("ray::", "Ray worker"),
    ("postgres: checkpointer", "PostgreSQL checkpointer: writes dirty pages at checkpoints"),
    ("postgres: background writer", "PostgreSQL background writer"),
    ("postgres: walwriter", "PostgreSQL WAL writer"),
    ("postgres: autovacuum launcher", "PostgreSQL autovacuum launcher: wakes every autovacuum_naptime"),
    ("postgres: logical replication launcher", "PostgreSQL logical replication launcher"),
    ("postgres: io worker", "PostgreSQL I/O worker"),
    ("postgres: ", "PostgreSQL backend: one client connection (pools of replicas, driver)"),
    ("postgres", "PostgreSQL postmaster"),
]


def describe(process: psutil.Process) -> tuple[str, str]:
    """(short name, what it does) of one process."""
    try:
        words = process.cmdline() or [process.name()]
    except psutil.Error:
        return "gone", "exited while it was looked at"
    line = " ".join(words)
    for marker, role in ROLES:
        if marker in line:
            # a process that names itself (Ray's workers and dashboard modules, Postgres's) is called that
            titled = words[0].startswith(("ray::", "postgres: ", "ray-dashboard-"))
            name = words[0].split(" (")[0] if titled else marker.rsplit("/", 1)[-1]
            if marker == "triton_python_backend_stub" and len(words) > 1:
                name = f"stub {Path(words[1]).parent.parent.name}"  # the model's directory in the repository
            return name[:60], role
    return Path(words[0]).name[:60], "not one es-ray names (a child of a stack process)"


def listening(processes: list[psutil.Process]) -> list[dict]:
    """TCP ports these processes listen on."""
    pids = {p.pid for p in processes}
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append({"pid": conn.pid, "address": f"{conn.laddr.ip}:{conn.laddr.port}"})
    return found


def listening_on(ports: set[int]) -> list[dict]:
    """Whoever listens on any of these TCP ports (a stack's recorded ports after `down`)."""
    return [{"pid": c.pid, "address": f"{c.laddr.ip}:{c.laddr.port}"}
            for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.laddr.port in ports]


def stack_ports(state_dir: Path) -> set[int]:
    """The TCP ports recorded in the state dir's manifest (its last `up`) and those kept by its model
    versions' tritonservers (es_ray/stack/triton.py: servers/v<N>/ports.json)."""
    from es_ray.stack.manifest import StackManifest

    kept = {int(port) for path in (Path(state_dir) / "triton" / "servers").glob("v*/ports.json")
            for port in json.loads(path.read_text()).values()}
    manifest = StackManifest.load(Path(state_dir))
    if manifest is None:
        return kept
    urls = [manifest.serve_url, manifest.serve_proxy_url, manifest.triton_url, manifest.triton_grpc_url,
            manifest.triton_metrics_url, manifest.ray_address, manifest.ray_dashboard_url,
            manifest.ray_metrics_url.removesuffix("/metrics")]
    return kept | {int(u.rsplit(":", 1)[1]) for u in urls if u and u.rsplit(":", 1)[-1].isdigit()}
