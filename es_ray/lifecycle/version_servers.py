"""One tritonserver per model version, for the embedded stack: a crash takes down one version, not all.

Triton 2.51's python backend can abort the whole server (DESIGN.md, triton-inference-server/server#8882),
most often around model loads. In one shared server, loading a new version put the version carrying
traffic at risk, and a restarted server came back empty until the lifecycle driver loaded the live
versions again. Here each version has a supervised server of its own (es_ray/stack/triton.py), started
with its two encoders on its command line (--load-model): the supervisor restarts a dead one with its
models loaded and its shared memory cleaned, and the other versions' servers never notice. A deploy
hands a version to clients only once both encoders have answered a test inference.

The same interface as deploy.TritonDeployer (deploy, undeploy, reload_missing), which stays for an
external Triton (triton.url), where every version is loaded into that one server.
"""

from __future__ import annotations

import threading
from pathlib import Path

from es_ray.config import Settings
from es_ray.inference import deploy, triton_repo
from es_ray.logs import get_logger
from es_ray.stack import triton

log = get_logger(__name__)


def served_models(version: int) -> tuple[str, ...]:
    return tuple(triton_repo.served_name(name, version) for name in triton_repo.ENCODERS)


class VersionServers:
    """Starts, checks and stops the per-version servers of one state dir, one change at a time."""

    def __init__(self, settings: Settings, state_dir: Path, on_address=None, ready_timeout_s: float = 180):
        """`on_address(version, grpc_url or None)` is told where a version answers once it is ready, and
        None once its server is stopped (the lifecycle driver records it for the clients)."""
        self.settings, self.state_dir, self.ready_timeout_s = settings, Path(state_dir), ready_timeout_s
        self.on_address = on_address or (lambda version, grpc_url: None)
        self.repo = triton.model_repository(self.state_dir)
        self._lock = threading.Lock()

    def deploy(self, version: int, model_dir: Path) -> dict[str, str]:
        """Writes the version's repository entry, starts its server (unless it runs) and waits for both
        encoders to answer; returns its addresses ({"http", "grpc"}: host:port)."""
        with self._lock:
            deploy.write(self.settings, self.repo, version, Path(model_dir))
            return self._serve(version)

    def _serve(self, version: int) -> dict[str, str]:
        address = triton.start_version(self.state_dir, self.settings, version, served_models(version))
        try:
            deploy.wait_ready(address["http"], version, self.ready_timeout_s)
        except BaseException:
            triton.stop_version(self.state_dir, version)  # never handed out: the next try starts it afresh
            raise
        self.on_address(version, address["grpc"])
        log.info("version_server.ready", version=version, **address)
        return address

    def undeploy(self, version: int) -> None:
        """Stops the version's server (Triton finishes the requests in flight first) and removes its files."""
        with self._lock:
            self.on_address(version, None)
            triton.stop_version(self.state_dir, version)
            triton_repo.remove_version(self.repo, version)

    def reload_missing(self, versions: list[int]) -> list[str]:
        """Starts the servers of `versions` (blue first) that are in the repository but not running, as
        after `es-ray down` and up (a crash needs nothing: the supervisor restarts its server); returns
        the models it started."""
        started = []
        with self._lock:
            for version in versions:
                if triton_repo.has_version(self.repo, version) and triton.running_pid(self.state_dir, version) is None:
                    self._serve(version)
                    started.extend(served_models(version))
        return started

    def address(self, version: int) -> dict[str, str]:
        return triton.version_address(self.state_dir, version)
