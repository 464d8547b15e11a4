"""`es-ray up`, `status` and `down`: the embedded stack as one unit, recorded in <state dir>/stack.json.

Each component is either started here (embedded default) or taken from configuration (an external
address), and `down` stops only what this state dir started. Ports chosen at the first `up` are
kept in the manifest, so a restarted stack listens where it did before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import requests

from es_ray.config import Settings
from es_ray.console import Display
from es_ray.inference import registry
from es_ray.logs import get_logger
from es_ray.serve import deployment
from es_ray.stack import credentials, postgres, ray_head, triton
from es_ray.stack.manifest import StackManifest, free_port, port_or_free, redacted_dsn

log = get_logger(__name__)


def _port(recorded_url: str, configured: int) -> int:
    """The port recorded at an earlier `up`, else the configured one, else a free one."""
    if recorded_url:
        return int(recorded_url.rsplit(":", 1)[1])
    return port_or_free(configured)


def up(settings: Settings, wait_s: float = 600, display: Display | None = None) -> StackManifest:
    """Starts what is not running yet, bootstraps the blue model, deploys Serve; returns once healthy.
    `display`: where a person watches the steps (`es-ray up`); tests and benchmarks pass none."""
    step = display.step if display else lambda text: None
    started = time.monotonic()
    state = settings.state_path
    state.mkdir(parents=True, exist_ok=True)
    settings = credentials.with_local_credentials(settings)
    manifest = StackManifest.load(state) or StackManifest(state_dir=str(state))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # PostgreSQL + pgvector
    step("PostgreSQL")
    if settings.postgres.dsn:
        manifest.postgres_dsn, manifest.postgres_started = settings.postgres.dsn, False
    else:
        manifest.postgres_dsn, manifest.postgres_started = postgres.start(state, settings.postgres.shared_buffers), True
    manifest.save()

    # Triton
    step("Triton")
    if settings.triton.url:
        manifest.triton_url = settings.triton.url
        manifest.triton_grpc_url = settings.triton.url.rsplit(":", 1)[0] + f":{settings.triton.grpc_port or 8001}"
        manifest.triton_pid = 0
    else:
        # Embedded: the lifecycle driver starts one tritonserver per model version
        # (es_ray/lifecycle/version_servers.py); each version's address is in Postgres (models).
        triton.stop(state)  # the one shared server an older es-ray started here, if it still runs
        manifest.triton_url = manifest.triton_grpc_url = manifest.triton_metrics_url = ""
        manifest.triton_pid = 0
    manifest.save()  # after each start: a failure further on leaves what `down` needs to stop it

    # MLflow: a sqlite file under the state dir unless a tracking server is configured.
    manifest.mlflow_uri = registry.tracking_uri(settings)

    # Ray head
    step("Ray head")
    if settings.ray.address:
        manifest.ray_address, manifest.ray_started = settings.ray.address, False
        manifest.ray_dashboard_url = manifest.ray_dashboard_url or f"http://127.0.0.1:{settings.ray.dashboard_port}"
    else:
        gcs_port = _port(manifest.ray_address, settings.ray.gcs_port)
        dashboard_port = _port(manifest.ray_dashboard_url, settings.ray.dashboard_port)
        # A head without a token file here was started before token authentication: start it again.
        if not (ray_head.is_running(state) and ray_head.dashboard_up(f"http://127.0.0.1:{dashboard_port}", state)
                and credentials.ray_token_path(state).exists()):
            ray_head.stop(state)  # leftovers of a crashed head
            # A restart reuses the recorded ports, which are free now: new ones must not collide with them.
            chosen = {gcs_port, dashboard_port}
            client_port = port_or_free(settings.ray.client_server_port, avoid=chosen)
            agent_port = free_port(avoid=chosen | {client_port})
            metrics_port = port_or_free(settings.ray.metrics_export_port, avoid=chosen | {client_port, agent_port})
            manifest.ray_started = True
            manifest.save()
            ray_head.start(state, gcs_port, dashboard_port, client_port, agent_port, metrics_port,
                           settings.ray.num_cpus, settings.ray.node_ip_address,
                           {**deployment.direct_ingress_env(settings), **settings.ray.env}, settings.ray.log_monitor)
            manifest.ray_metrics_url = f"http://{settings.ray.node_ip_address}:{metrics_port}/metrics"
            manifest.ray_head_ingress = deployment.head_ingress(settings)
            # Serve's proxy, beside a direct-ingress replica: a port free now, kept while this head runs.
            proxy_port = free_port(avoid=chosen | {client_port, agent_port, metrics_port, settings.serve.port})
            manifest.serve_proxy_url = f"http://{settings.serve.host}:{proxy_port}" if settings.direct_ingress else ""
        elif not manifest.ray_head_ingress:  # started by an es-ray that recorded none: its proxy serves as then
            if settings.direct_ingress:
                log.warning("stack.head_without_direct_ingress", wanted=deployment.head_ingress(settings),
                            note="serving through Serve's proxy until `es-ray down` and `es-ray up`")
        elif manifest.ray_head_ingress != deployment.head_ingress(settings):
            raise RuntimeError(f"the running Ray head was started for ingress {manifest.ray_head_ingress or 'proxy'!r} "
                               f"and the settings now ask for {deployment.head_ingress(settings)!r} (serve.ingress, "
                               "serve.port): that is in the head's environment, so run `es-ray down`, then `es-ray up`")
        manifest.ray_address, manifest.ray_started = f"{settings.ray.node_ip_address}:{gcs_port}", True
        manifest.ray_dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    manifest.serve_url = f"http://{settings.serve.host}:{settings.serve.port}"
    manifest.save()

    step("lifecycle driver (loads the blue model into Triton) and Serve")
    _start_driver_and_serve(settings, manifest)
    step(f"waiting for {manifest.serve_url}/healthz")
    wait_healthy(manifest.serve_url, wait_s)
    log.info("stack.up", seconds=round(time.monotonic() - started, 1), url=manifest.serve_url)
    return manifest


def _start_driver_and_serve(settings: Settings, manifest: StackManifest) -> None:
    import ray
    from ray import serve

    from es_ray.lifecycle.driver import start_driver

    os.environ.update({k: v for k, v in ray_head.environment(Path(manifest.state_dir)).items()
                       if k.startswith(("RAY_", "HF_", "TOKENIZERS")) and not k.startswith("RAY_AUTH_")})
    if manifest.ray_started:  # an external cluster's authentication is its operator's (RAY_AUTH_* as set)
        ray_head.use_head(Path(manifest.state_dir), settings.ray.node_ip_address)
    ray.init(address=manifest.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    try:
        driver = start_driver(settings, manifest)
        ray.get(driver.ensure_serving.remote())
        # With direct ingress (an embedded head: its environment has it) the replica listens on serve.port,
        # and Serve still starts its proxy (a replica serves HTTP only where proxies are on): on another port.
        proxy_port = _port(manifest.serve_proxy_url, 0) if manifest.serve_proxy_url else settings.serve.port
        # The port is chosen where the head starts (up), so it is the one Serve keeps while the head runs.
        serve.start(http_options={"host": settings.serve.host, "port": proxy_port},
                    logging_config={"enable_access_log": False})
        _deploy_app(settings, manifest)
    finally:
        ray.shutdown()


def _deploy_app(settings: Settings, manifest: StackManifest) -> None:
    """Deploys the API unless the running app has these settings and this code already: `es-ray cycle` and
    the demo call `up` on a running stack, and a redeploy for nothing restarts the replica. The deployment's
    options come from configs/stack.yaml (serve/deployment.py); a new app starts its replicas with the
    driver's current settings (keys, limits)."""
    from ray import serve

    from es_ray.serve.app import build_app

    name, wanted = settings.serve.app_name, deployment.deployed_version(settings)
    status = _app_status(name)
    if status in ("RUNNING", "DEPLOYING", "UNHEALTHY") and manifest.serve_deployed == wanted:
        return  # Serve itself replaces an unhealthy replica of the same app
    log.info("stack.serve_deploy", app=name, status=status, deployed=manifest.serve_deployed, wanted=wanted)
    if status is not None and manifest.serve_proxy_url:
        # Direct ingress: the replica itself listens on serve.port, so Serve's rolling update (the new
        # replica first, then the old one stopped) cannot hand the port over: the new one's bind fails
        # while the old one holds it. The old app goes first, and serve.port answers nothing until the
        # new replica has started (it binds over the old one's closing connections: serve/port_reuse.py).
        log.warning("stack.serve_restart", app=name, status=status,
                    reason="settings or code changed; direct ingress restarts the replica in place")
        serve.delete(name)
    serve.run(build_app(deployment.app_args(settings)), name=name, route_prefix="/", blocking=False)
    manifest.serve_deployed = wanted
    manifest.save()


def _app_status(name: str) -> str | None:
    """The Serve app's status (RUNNING, DEPLOYING, UNHEALTHY, DEPLOY_FAILED, DELETING), None where it is absent."""
    from ray import serve

    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001 - no Serve controller yet: nothing runs
        return None
    # ApplicationStatus is a str enum: its value is the name (str() would give 'ApplicationStatus.RUNNING').
    return app.status.value if app is not None else None


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{url}/healthz", timeout=10)
            if response.status_code == 200:
                return
            last = response.text
        except requests.RequestException as err:
            last = str(err)
        time.sleep(1)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout_s}s: {last}")


def down(settings: Settings) -> list[str]:
    """Stops what this state dir started, and nothing else; returns what it stopped."""
    state = settings.state_path
    manifest = StackManifest.load(state)
    stopped = []
    if manifest is None:
        return stopped
    if manifest.ray_started:
        if ray_head.stop(state):
            stopped.append("ray")
    elif manifest.ray_address:
        _remove_from_external_ray(settings, manifest)
        stopped.append("serve app and lifecycle driver")
    stopped.extend(triton.stop_all(state))  # the stack's server and every model version's (lifecycle/version_servers.py)
    if manifest.postgres_started and postgres.is_running(state):
        postgres.stop(state)
        stopped.append("postgres")
    log.info("stack.down", stopped=stopped)
    return stopped


def _remove_from_external_ray(settings: Settings, manifest: StackManifest) -> None:
    import ray
    from ray import serve

    from es_ray.lifecycle.handle import DRIVER_NAME

    ray.init(address=manifest.ray_address, namespace=settings.ray.namespace, logging_level="warning")
    try:
        serve.delete(settings.serve.app_name)
        ray.kill(ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace), no_restart=True)
    except ValueError:
        pass
    finally:
        ray.shutdown()


def status(settings: Settings) -> dict[str, Any]:
    """What runs, read without starting anything."""
    state = settings.state_path
    manifest = StackManifest.load(state)
    if manifest is None:
        return {"state_dir": str(state), "running": False, "note": "no stack.json: `es-ray up` has not run here"}
    report: dict[str, Any] = {"state_dir": str(state)}
    report["ray"] = {"address": manifest.ray_address, "dashboard": manifest.ray_dashboard_url,
                     "metrics": manifest.ray_metrics_url, "up": ray_head.dashboard_up(manifest.ray_dashboard_url, state)}
    report["postgres"] = {"dsn": redacted_dsn(manifest.postgres_dsn), "up": _postgres_up(manifest.postgres_dsn)}
    if manifest.triton_url:
        report["triton"] = {"http": manifest.triton_url, "grpc": manifest.triton_grpc_url,
                            "up": _http_ok(f"http://{manifest.triton_url}/v2/health/live")}
    else:  # one server per model version
        servers = {f"v{version}": triton.version_address(state, version) for version in triton.versions_running(state)}
        for address in servers.values():
            address["up"] = _http_ok(f"http://{address['http']}/v2/health/live")
        report["triton"] = {"servers": servers, "up": bool(servers) and all(a["up"] for a in servers.values())}
    report["mlflow"] = {"tracking_uri": manifest.mlflow_uri, "up": _mlflow_up(manifest.mlflow_uri)}
    report["serve"] = {"url": manifest.serve_url, "healthy": _http_ok(f"{manifest.serve_url}/healthz")}
    if report["postgres"]["up"]:
        report.update(_blue_and_count(manifest.postgres_dsn))
    return report


def _http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _postgres_up(dsn: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _mlflow_up(uri: str) -> bool:
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).exists()
    return _http_ok(f"{uri.rstrip('/')}/health")


def _blue_and_count(dsn: str) -> dict[str, Any]:
    import psycopg

    from es_ray.store import db, blue_green, fusion_weights
    from es_ray.store.collections import Collection

    try:
        with db.connect(dsn) as conn:
            blue = blue_green.get_blue(conn)
            if blue is None:
                return {"blue": None, "items": 0}
            return {"blue": {"model_version": blue.model_version, "collection": blue.collection},
                    "items": Collection(blue.collection, blue.dim).count(conn),
                    # hybrid's promoted fusion (es-ray learn-fusion); none: search.* configures it
                    "fusion": fusion_weights.record(conn, blue.collection) or "configured (search.*)"}
    except psycopg.Error as err:
        return {"blue": f"error: {err}"}
