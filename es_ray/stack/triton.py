"""Embedded Triton Inference Server: the `tritonserver` binary shipped inside the nvidia-pytriton wheel.

Runs in explicit model-control mode over <state dir>/triton/models, so a server loads only the models
on its command line and those the lifecycle driver asks for. The embedded stack runs one server per
model version (start_version; es_ray/lifecycle/version_servers.py says why), each supervised, with its
files under <state dir>/triton/servers/v<N>. The wheel bundles just the python backend; its stub process
needs the interpreter's lib dir and the wheel's bundled libs on LD_LIBRARY_PATH (see DESIGN.md).

Triton listens on loopback only, and its model-repository API (load, unload, index: a load can carry a
model.py, which Triton runs) answers only requests with the driver's key in a header (the restricted-API
options; the key is made under <state dir>/auth, see credentials.py). Inference, health and metadata stay
open to local clients. The key is on tritonserver's command line, which local users can read in /proc
unless it is mounted with hidepid: the restriction keeps out clients that can only send requests (a web
page making a browser post to 127.0.0.1, a server-side request forgery), not a local user.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import psutil

from es_ray.config import Settings
from es_ray.logs import get_logger
from es_ray.stack import credentials
from es_ray.stack.manifest import free_port
from es_ray.stack.supervisor import kill_group, remove_shm

log = get_logger(__name__)

CONTROL_HEADER = "es-ray-model-control"  # the header Triton's model-repository API demands (with the key)
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"  # what changes the server, not a search


def model_repository(state_dir: Path) -> Path:
    return state_dir / "triton" / "models"


def shm_prefix(state_dir: Path, version: int | None = None) -> str:
    """The names of one server's python-backend shared memory regions in /dev/shm start with this (the
    backend adds a UUID per stub): its supervisor removes only that server's leftovers after a crash."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return f"esray_{digest}_{'stack' if version is None else f'v{int(version)}'}_"


def shm_byte_size(settings: Settings) -> int:
    """Each stub's shared memory, large enough that it never grows (configs/stack.yaml, triton.shm_batches):
    a batch is max_batch_size x max_length x 2 int64 inputs, plus at most as many bytes of output."""
    batch = settings.triton.max_batch_size * settings.model.max_length * 2 * 8 * 2
    mib = 1024 * 1024
    return -(-batch * settings.triton.shm_batches // mib) * mib  # whole MiB, at least one batch


def backend_config(state_dir: Path, settings: Settings, version: int | None = None) -> list[str]:
    """The python backend's options (its source, python_be.cc, reads them from --backend-config): a region
    that never grows (growth by the same size, should a batch ever exceed it) and the server's own prefix."""
    size = shm_byte_size(settings)
    return [f"--backend-config=python,shm-default-byte-size={size}",
            f"--backend-config=python,shm-growth-byte-size={size}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix(state_dir, version)}"]


def _install_server(state_dir: Path) -> Path:
    """Copies the server out of the wheel once, with the stub for this Python placed in the backend dir."""
    from pytriton.utils.distribution import get_libs_path, get_root_module_path, get_stub_path

    server_dir = state_dir / "triton" / "server"
    stub_dst = server_dir / "backends" / "python" / "triton_python_backend_stub"
    if not stub_dst.exists():
        dist = get_root_module_path() / "tritonserver"
        shutil.copytree(dist, server_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"), stub_dst)
    (server_dir / "libs").unlink(missing_ok=True)
    (server_dir / "libs").symlink_to(get_libs_path())
    return server_dir


def _environment(server_dir: Path) -> dict[str, str]:
    env = os.environ.copy()
    lib_dirs = [str(server_dir / "libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = ":".join([d for d in lib_dirs if d] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    # The stub runs the base interpreter; the venv's bin first on PATH keeps its tools visible.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def files_dir(state_dir: Path, version: int | None = None) -> Path:
    """Where one server's pid files, ports and log live: the stack's server in <state>/triton, the server
    of model version N in <state>/triton/servers/vN."""
    base = state_dir / "triton"
    return base if version is None else base / "servers" / f"v{int(version)}"


def start(state_dir: Path, settings: Settings, http_port: int, grpc_port: int, metrics_port: int,
          timeout_s: float = 60, version: int | None = None, models: tuple[str, ...] = ()) -> int:
    """Starts a supervised tritonserver detached from this process (whose exit must not take it along:
    the lifecycle driver's Ray worker kills its children when it exits) and waits until it is live;
    returns the supervisor's pid. `models` are loaded at every start of the server (--load-model), so
    one the supervisor restarts comes back with them, without waiting for anybody to load them again."""
    server_dir = _install_server(state_dir)
    repo = model_repository(state_dir)
    repo.mkdir(parents=True, exist_ok=True)
    files = files_dir(state_dir, version)
    files.mkdir(parents=True, exist_ok=True)
    restricted = f"{RESTRICTED_APIS}:{CONTROL_HEADER}={credentials.ensure_triton_control_key(state_dir)}"
    command = [
        str(server_dir / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        "--model-control-mode=explicit",
        *[f"--load-model={model}" for model in models],
        f"--backend-directory={server_dir / 'backends'}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
        "--exit-on-error=false",
        "--strict-readiness=false",
        "--log-verbose=0",
        *backend_config(state_dir, settings, version),
    ]
    # Under the supervisor (es_ray/stack/supervisor.py), which restarts a tritonserver that dies. The
    # shell starts it in the background and exits: the supervisor is nobody's child here.
    supervisor = [sys.executable, "-m", "es_ray.stack.supervisor", "--name", "triton" + (f"-v{version}" if version else ""),
                  "--child-pid-file", str(files / "tritonserver.pid"),
                  "--shm-prefix", shm_prefix(state_dir, version), "--", *command]
    launcher = subprocess.run(["sh", "-c", '"$@" >>"$0" 2>&1 </dev/null & echo $!', str(files / "tritonserver.log"),
                               *supervisor], env=_environment(server_dir), cwd=state_dir, start_new_session=True,
                              capture_output=True, text=True, check=True)
    pid = int(launcher.stdout.strip())
    (files / "supervisor.pid").write_text(str(pid))
    try:
        wait_live(f"127.0.0.1:{http_port}", timeout_s,
                  lambda: _alive(files / "supervisor.pid", "es_ray.stack.supervisor") is not None)
    except BaseException:
        stop(state_dir, version=version)  # a server that never came up must not be left restarting
        raise
    log.info("triton.started", supervisor_pid=pid, pid=server_pid(state_dir, version), http_port=http_port,
             grpc_port=grpc_port, version=version, models=list(models))
    return pid


def control_headers(state_dir: Path) -> dict[str, str]:
    """What a model load or unload sends to the embedded Triton; nothing for an external one (no key here)."""
    key = credentials.triton_control_key(state_dir)
    return {CONTROL_HEADER: key} if key else {}


def _alive(pid_file: Path, marker: str) -> psutil.Process | None:
    try:
        process = psutil.Process(int(pid_file.read_text()))
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE and marker in " ".join(process.cmdline()):
            return process
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def server_pid(state_dir: Path, version: int | None = None) -> int | None:
    """The tritonserver process itself (its pid changes when the supervisor restarts it)."""
    process = _alive(files_dir(state_dir, version) / "tritonserver.pid", "tritonserver")
    return process.pid if process else None


def wait_live(url: str, timeout_s: float, running=None) -> None:
    """Waits until Triton at `url` is live; gives up early once `running()` says its process is gone."""
    import tritonclient.http as triton_http

    deadline = time.monotonic() + timeout_s
    client = triton_http.InferenceServerClient(url)
    while time.monotonic() < deadline:
        if running is not None and not running():
            raise RuntimeError(f"tritonserver for {url} exited; see its log in the state dir")
        try:
            if client.is_server_live():
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.3)
    raise TimeoutError(f"Triton at {url} not live after {timeout_s}s")


def running_pid(state_dir: Path, version: int | None = None) -> int | None:
    """The supervisor's pid, or (left by an older es-ray or an orphan) a bare tritonserver's; None if neither runs."""
    process = _alive(files_dir(state_dir, version) / "supervisor.pid", "es_ray.stack.supervisor")
    return process.pid if process else server_pid(state_dir, version)


def stop(state_dir: Path, timeout_s: float = 30, version: int | None = None) -> None:
    """Stops the supervisor (it stops tritonserver), then anything of Triton's still running."""
    files = files_dir(state_dir, version)
    processes = [p for p in (_alive(files / "supervisor.pid", "es_ray.stack.supervisor"),
                             _alive(files / "tritonserver.pid", "tritonserver")) if p is not None]
    server = server_pid(state_dir, version)
    if processes:
        family = processes + [child for p in processes for child in p.children(recursive=True)]  # + backend stubs
        processes[0].terminate()
        _, alive = psutil.wait_procs(family, timeout=timeout_s)
        for leftover in alive:
            leftover.kill()
    if server is not None:  # stubs of an earlier tritonserver that died: its process group (supervisor.py)
        kill_group(server)
    remove_shm(shm_prefix(state_dir, version))  # a supervisor killed before its child leaves them behind
    (files / "supervisor.pid").unlink(missing_ok=True)
    (files / "tritonserver.pid").unlink(missing_ok=True)
    if processes:
        log.info("triton.stopped", pids=[p.pid for p in processes], version=version)


# --- one tritonserver per model version (the embedded stack) -----------------------------------------

def start_version(state_dir: Path, settings: Settings, version: int, models: tuple[str, ...],
                  timeout_s: float = 60) -> dict[str, str]:
    """The server of one model version, serving `models` (its two encoders): started unless it runs.
    Its ports are chosen once and kept in ports.json, so its address outlives restarts of the stack.
    Returns its addresses: {"http": host:port, "grpc": host:port}."""
    files = files_dir(state_dir, version)
    files.mkdir(parents=True, exist_ok=True)
    ports_file = files / "ports.json"
    ports = json.loads(ports_file.read_text()) if ports_file.exists() else {}
    if running_pid(state_dir, version) is None:
        # Kept ports are ephemeral ones: after a down/up another process may hold one, and a server that
        # cannot bind would be restarted forever. Those taken are chosen again (clients learn the address
        # from the deploy, keyed by it).
        chosen: set[int] = set()
        for name in ("http", "grpc", "metrics"):
            if not ports.get(name) or not port_is_free(ports[name]) or ports[name] in chosen:
                ports[name] = free_port(avoid=chosen)
            chosen.add(ports[name])
        ports_file.write_text(json.dumps(ports))
        start(state_dir, settings, ports["http"], ports["grpc"], ports["metrics"], timeout_s, version, models)
    return version_address(state_dir, version)


def version_address(state_dir: Path, version: int) -> dict[str, str]:
    ports = json.loads((files_dir(state_dir, version) / "ports.json").read_text())
    return {"http": f"127.0.0.1:{ports['http']}", "grpc": f"127.0.0.1:{ports['grpc']}"}


def stop_version(state_dir: Path, version: int) -> None:
    """Stops the version's server and forgets its ports; its log stays (what it did, aborts included)."""
    stop(state_dir, version=version)
    (files_dir(state_dir, version) / "ports.json").unlink(missing_ok=True)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True


def versions_running(state_dir: Path) -> list[int]:
    servers = files_dir(state_dir, 0).parent
    found = [int(d.name[1:]) for d in servers.glob("v*") if d.name[1:].isdigit()] if servers.exists() else []
    return sorted(v for v in found if running_pid(state_dir, v) is not None)


def stop_all(state_dir: Path) -> list[str]:
    """Every tritonserver of this state dir: each version's, then the stack's. Returns what it stopped."""
    stopped = []
    for version in versions_running(state_dir):
        stop(state_dir, version=version)
        stopped.append(f"triton-v{version}")
    if running_pid(state_dir) is not None:
        stop(state_dir)
        stopped.append("triton")
    return stopped
