"""The embedded Ray head: `ray start --head` with its temp dir under the state dir.

`ray stop` would stop every Ray process on the machine, so `stop()` ends only the processes that
belong to this state dir's head (they all carry its temp dir on their command line).

Anyone who can submit a Ray job runs code on the cluster, so the head runs with Ray's token
authentication (RAY_AUTH_MODE=token, the token in <state dir>/auth/ray.token, see credentials.py) and
listens on `ray.node_ip_address` (loopback unless a multi-node cluster needs a reachable address); its
dashboard on loopback. Ray's processes inherit the environment of `ray start`, so the replicas, the
lifecycle driver and the jobs carry the token; a client in another process calls `use_head` first.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from es_ray.logs import get_logger
from es_ray.stack import credentials

log = get_logger(__name__)


def temp_dir(state_dir: Path) -> Path:
    return state_dir / "ray"


def auth_environment(state_dir: Path) -> dict[str, str]:
    """What a Ray client needs to reach this state dir's head: token mode and where the token is."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(credentials.ray_token_path(state_dir))}


def use_head(state_dir: Path, node_ip_address: str) -> None:
    """Makes Ray calls of this process (ray.init, the job and state APIs) reach this state dir's head
    and authenticate to it."""
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path (another cluster's token)
    os.environ.update(auth_environment(state_dir))
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode

    # Ray reads RAY_AUTH_MODE once, when it is imported: a process that imported it earlier reads the
    # configuration again, as `ray start` does when it turns token authentication on.
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    if single_machine(node_ip_address):
        # A client turns a loopback cluster address into the machine's own too, where the head does not
        # listen, unless it is in single-machine mode (read by Ray when imported: set here as well).
        os.environ.update(SINGLE_MACHINE)
        ray_constants.ENABLE_RAY_CLUSTER = False


SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def single_machine(node_ip_address: str) -> bool:
    """Does the head run in Ray's single-machine mode (a loopback node address, see start)?"""
    return ipaddress.ip_address(node_ip_address).is_loopback


def environment(state_dir: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(auth_environment(state_dir))
    # Job entrypoints say `python`: make it this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    env["RAY_TMPDIR"] = str(temp_dir(state_dir))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray starts every worker at nice 15, and es-ray's serving runs in Ray workers too (the Serve proxy and
    # replicas, the lifecycle driver): they would share one priority with a fine-tune's trials (measured:
    # bench/results/priority-*.json). Workers start at 0 here; batch work lowers itself to ray.batch_nice
    # (es_ray/priority.py). An environment that sets RAY_worker_niceness keeps its own.
    env.setdefault("RAY_worker_niceness", "0")
    # Serve's HTTP proxy is uvicorn, which by default believes X-Forwarded-For from 127.0.0.1 and hands the
    # replica that address as the peer: any local client could then name itself anyone (and vote as many
    # clients). Trust no one there; es-ray reads the header itself, from clients.trusted_proxies only
    # (serve/clients.py).
    env["FORWARDED_ALLOW_IPS"] = ""
    return env


def start(state_dir: Path, gcs_port: int, dashboard_port: int, client_server_port: int, agent_port: int,
          metrics_port: int, num_cpus: int = 0, node_ip_address: str = "127.0.0.1",
          ray_env: dict[str, str] | None = None, log_monitor: bool = False) -> None:
    """`ray_env`: Ray's own settings (configs/stack.yaml `ray.env`), inherited by every Ray process;
    `log_monitor`: whether workers' output is forwarded to drivers (configs/stack.yaml `ray.log_monitor`)."""
    temp = temp_dir(state_dir)
    temp.mkdir(parents=True, exist_ok=True)
    credentials.ensure_ray_token(state_dir)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head",
               f"--node-ip-address={node_ip_address}", f"--port={gcs_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--ray-client-server-port={client_server_port}", f"--dashboard-agent-listen-port={agent_port}",
               f"--metrics-export-port={metrics_port}",
               f"--temp-dir={temp}", "--disable-usage-stats", f"--include-log-monitor={str(log_monitor).lower()}"]
    if num_cpus:
        command.append(f"--num-cpus={num_cpus}")
    env = {**environment(state_dir), **(ray_env or {})}
    if single_machine(node_ip_address):
        # `ray start` replaces a loopback node address by the machine's own, and its servers then listen
        # on every interface. Ray's single-machine mode (its default on macOS and Windows, the variable
        # says so) keeps the address, so the GCS, raylet, workers, agents and metrics listen on loopback.
        # Its processes (replicas, driver, jobs) inherit it; other clients call use_head.
        env.update(SINGLE_MACHINE)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    wait_dashboard(f"http://127.0.0.1:{dashboard_port}", 120, state_dir)
    log.info("ray.started", address=f"{node_ip_address}:{gcs_port}", dashboard=f"http://127.0.0.1:{dashboard_port}",
             auth="token")


def wait_dashboard(url: str, timeout_s: float, state_dir: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if dashboard_up(url, state_dir):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {url} did not answer within {timeout_s}s")


def dashboard_up(url: str, state_dir: Path | None = None) -> bool:
    """Does the dashboard's job API answer (with the state dir's Ray token, where there is one)?"""
    token = credentials.ray_token_path(state_dir) if state_dir is not None else None
    headers = {"Authorization": f"Bearer {token.read_text().strip()}"} if token and token.exists() else {}
    try:
        return requests.get(f"{url}/api/version", headers=headers, timeout=2).ok
    except requests.RequestException:
        return False


def processes(state_dir: Path) -> list[psutil.Process]:
    marker = str(temp_dir(state_dir))
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    # Workers are children of the raylet and may not carry the marker themselves.
    children = [c for p in found for c in _children(p)]
    return list({p.pid: p for p in found + children + _client_servers(found)}.values())


def _client_servers(found: list[psutil.Process]) -> list[psutil.Process]:
    """Ray Client's proxy (`ray.util.client.server`): started by `ray start`, which exits, so it is nobody's
    child, and its command line names the head only by the GCS address. Found by that port."""
    ports = set()
    for process in found:
        try:
            ports.update(part.split("=", 1)[1] for part in process.cmdline() if part.startswith("--gcs_server_port="))
        except psutil.Error:
            continue
    servers = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if "ray.util.client.server" in cmdline and any(
                    part.startswith("--address=") and part.rsplit(":", 1)[-1] in ports for part in cmdline):
                servers.append(process)
        except psutil.Error:
            continue
    return servers


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def is_running(state_dir: Path) -> bool:
    return bool(processes(state_dir))


def stop(state_dir: Path, timeout_s: float = 20) -> int:
    victims = [p for p in processes(state_dir) if p.pid != os.getpid()]
    for process in victims:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    log.info("ray.stopped", processes=len(victims))
    return len(victims)
