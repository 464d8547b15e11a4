"""The control surfaces are closed: what listens beyond loopback wants a credential, Ray wants its token,
Triton's model control wants the driver's key, and no secret leaves the state dir by a world-readable
file, `es-ray status` or a lifecycle driver call."""

from __future__ import annotations

import ipaddress
import json
import stat
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException
from typer.testing import CliRunner

from es_ray.cli import app
from es_ray.config import load_settings
from es_ray.inference.triton_repo import QUERY_ENCODER, served_name
from es_ray.stack import credentials, ray_head, triton
from es_ray.stack.manifest import StackManifest
from tests.helpers import search

PASSWORD = "hunter2-not-for-print"


# --- without a stack -------------------------------------------------------------------------------

def test_manifest_is_readable_by_its_owner_only(tmp_path):
    StackManifest(state_dir=str(tmp_path), postgres_dsn=f"postgresql://es:{PASSWORD}@db.example/es").save()
    mode = stat.S_IMODE(StackManifest.path(tmp_path).stat().st_mode)
    assert mode == 0o600, oct(mode)


def test_status_prints_the_dsn_without_its_password(tmp_path):
    # Nothing listens at these addresses: status reports them down, quickly.
    StackManifest(state_dir=str(tmp_path), postgres_dsn=f"postgresql://es:{PASSWORD}@127.0.0.1:1/es",
                  triton_url="127.0.0.1:1", serve_url="http://127.0.0.1:1",
                  ray_dashboard_url="http://127.0.0.1:1").save()
    for as_json in ([], ["--json"]):
        result = CliRunner().invoke(app, ["status", "--state-dir", str(tmp_path), *as_json])
        assert result.exit_code == 0, result.output
        assert PASSWORD not in result.output and "127.0.0.1" in result.output, result.output
        assert "user=es" in result.output or "es@" in result.output, result.output  # the rest is still shown


def test_actors_get_settings_without_the_user_token_secret(tmp_path, monkeypatch):
    monkeypatch.delenv(credentials.USER_TOKEN_SECRET_ENV, raising=False)
    settings = credentials.with_local_credentials(load_settings(tmp_path))
    secret = settings.auth.user_token_secret
    assert len(secret) >= 32
    secret_file = credentials.auth_dir(tmp_path) / "user_token.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    public = credentials.without_secrets(settings)
    assert secret not in public.model_dump_json()
    # A replica puts it back from the state dir, or from the environment where a deployment sets it.
    assert credentials.with_user_token_secret(public).auth.user_token_secret == secret
    monkeypatch.setenv(credentials.USER_TOKEN_SECRET_ENV, "x" * 40)
    assert credentials.with_user_token_secret(public).auth.user_token_secret == "x" * 40


def test_a_configured_user_token_secret_reaches_the_replicas_through_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(credentials.USER_TOKEN_SECRET_ENV, raising=False)
    configured = load_settings(tmp_path, auth={"user_token_secret": "c" * 48})
    credentials.with_local_credentials(configured)
    public = credentials.without_secrets(configured)
    assert credentials.with_user_token_secret(public).auth.user_token_secret == "c" * 48


# --- on the running stack --------------------------------------------------------------------------

def _stack_processes(state_dir: Path) -> list[psutil.Process]:
    """Every process of this state dir's stack: Ray's (head, workers, replicas, driver), Triton's and
    Postgres' (their command lines name the state dir), and their children."""
    marker = str(state_dir)
    found = list(ray_head.processes(state_dir))
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in process.info["cmdline"] or []):
                found += [process, *process.children(recursive=True)]
        except psutil.Error:
            continue
    return list({p.pid: p for p in found}.values())


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _listening(processes: list[psutil.Process]) -> list[tuple[str, int, int, str]]:
    sockets = []
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    sockets.append((conn.laddr.ip, conn.laddr.port, process.pid, name))
        except psutil.Error:
            continue  # ended meanwhile
    return sockets


def test_nothing_of_the_stack_listens_beyond_loopback_without_authentication(stack, settings):
    processes = _stack_processes(settings.state_path)
    names = {p.name() for p in processes if p.is_running()}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    assert any("tritonserver" in n for n in names) and any("postgres" in n for n in names), names
    sockets = _listening(processes)
    ports = {port for _, port, _, _ in sockets}
    gcs_port = int(stack.ray_address.rsplit(":", 1)[1])
    blue_triton = triton.version_address(settings.state_path, triton.versions_running(settings.state_path)[0])
    assert gcs_port in ports and int(blue_triton["http"].rsplit(":", 1)[1]) in ports, sockets  # the listing sees them
    # Beyond loopback, only what is seen to refuse a caller without Ray's token (a Serve replica's gRPC
    # server for calls between deployments: Ray binds it to every interface), and es-ray's own HTTP API
    # where serve.host puts it there (public search by design; API keys and user tokens guard the rest).
    beyond = [s for s in sockets if not _is_loopback(s[0]) and s[1] != settings.serve.port]
    unauthenticated = [s for s in beyond
                       if not (s[3].startswith("ray::ServeReplica") and _grpc_refuses_callers_without_ray_token(s[1]))]
    assert unauthenticated == [], f"listening beyond loopback without authentication: {unauthenticated}"


def _grpc_refuses_callers_without_ray_token(port: int) -> bool:
    """A Serve replica's gRPC server answers a call without Ray's token, or with a wrong one, with
    UNAUTHENTICATED (Ray's interceptor comes before the method)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
        for metadata in ([], [("authorization", "Bearer " + "0" * 64)]):
            try:
                call(b"", timeout=10, metadata=metadata)
                return False
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                    return False
    return True


def test_ray_refuses_callers_without_its_token(stack, settings):
    token = credentials.ray_token_path(settings.state_path).read_text().strip()
    assert stat.S_IMODE(credentials.ray_token_path(settings.state_path).stat().st_mode) == 0o600

    # The GCS (gRPC): what a job submission or a `ray.init` from elsewhere starts with.
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(stack.ray_address) as channel:
        nodes = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        with pytest.raises(grpc.RpcError) as wrong:
            nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                 metadata=[("authorization", "Bearer " + "0" * 64)])
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED, wrong.value
        reply = nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10,
                                     metadata=[("authorization", f"Bearer {token}")])
        assert len(reply.node_info_list) >= 1

    # The dashboard (HTTP): job submission, the state API.
    jobs = f"{stack.ray_dashboard_url}/api/jobs/"
    assert httpx.get(jobs, timeout=10).status_code == 401
    assert httpx.get(jobs, headers={"Authorization": "Bearer " + "0" * 64}, timeout=10).status_code == 403
    assert httpx.get(jobs, headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code == 200
    submitted = httpx.post(jobs, json={"entrypoint": "echo pwned"}, timeout=10)
    assert submitted.status_code == 401, submitted.text


def test_the_lifecycle_driver_hands_out_no_secret(stack, settings):
    import ray

    from es_ray.lifecycle.handle import DRIVER_NAME

    secret = (credentials.auth_dir(settings.state_path) / "user_token.secret").read_text().strip()
    assert not ray.is_initialized(), "an earlier test left this process connected to a Ray instance"
    ray.init(address=stack.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    try:
        handed_out = ray.get(ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace).stack.remote())
    finally:
        ray.shutdown()
    assert handed_out["settings"]["auth"]["user_token_secret"] == ""
    assert secret not in json.dumps(handed_out)


def test_user_tokens_still_work_with_the_secret_read_by_the_replicas(api, anon):
    issued = api.post("/v1/users/surfaces-user/token", json={}).json()
    forged = issued["token"][:-1] + ("A" if issued["token"][-1] != "A" else "B")
    path = "/v1/users/surfaces-user/personalisation"
    assert anon.delete(path, headers={"X-User-Token": forged}).status_code == 401
    mine = anon.delete(path, headers={"X-User-Token": issued["token"]})
    assert mine.status_code in (200, 204), mine.text


def test_triton_model_control_wants_the_drivers_key(stack, settings, api, probe_items):
    blue = api.get("/v1/lifecycle").json()["blue"]
    model, version = served_name(QUERY_ENCODER, blue["model_version"]), str(blue["model_version"])
    address = triton.version_address(settings.state_path, blue["model_version"])  # blue's own tritonserver
    url = f"http://{address['http']}"
    headers = triton.control_headers(settings.state_path)
    assert headers, "the embedded Triton has no control key"

    # Over HTTP: a load (which can carry a model.py: code Triton runs), an unload, the repository index.
    for path in (f"/v2/repository/models/{model}/load", f"/v2/repository/models/{model}/unload",
                 "/v2/repository/index"):
        refused = httpx.post(f"{url}{path}", json={}, timeout=30)
        assert refused.status_code in (401, 403), (path, refused.status_code, refused.text)
        wrong = httpx.post(f"{url}{path}", json={}, headers={triton.CONTROL_HEADER: "not-the-key"}, timeout=30)
        assert wrong.status_code in (401, 403), (path, wrong.status_code, wrong.text)
    # Over gRPC too.
    grpc_client = tritonclient.grpc.InferenceServerClient(address["grpc"])
    with pytest.raises(InferenceServerException):
        grpc_client.unload_model(model)
    with pytest.raises(InferenceServerException):
        grpc_client.load_model(model)
    grpc_client.close()

    http_client = tritonclient.http.InferenceServerClient(address["http"])
    assert http_client.is_model_ready(model, version)   # nothing of the above unloaded it
    http_client.load_model(model, headers=headers)       # the driver's key: accepted (already loaded: a no-op)
    assert http_client.is_model_ready(model, version)
    http_client.close()

    # Search (inference, health) stays open.
    found = search(api, "protein folding in cells")
    assert found["results"], found

