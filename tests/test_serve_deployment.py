"""How `es-ray up` deploys the API, without a stack: the options come from configs/stack.yaml
(environment overrides included), and any settings change gives the deployment a new settings version."""

import asyncio
import errno
import socket

import pytest
from pydantic import ValidationError

from es_ray.config import ApiKeyEntry, load_settings
from es_ray.serve import deployment
from es_ray.serve.app import search_api


def test_the_deployment_takes_its_options_from_stack_yaml(monkeypatch, tmp_path):
    settings = load_settings(tmp_path / "state")
    api = search_api(deployment.app_args(settings))
    assert (api.num_replicas, api.max_ongoing_requests) == (settings.serve.replicas, settings.serve.max_ongoing_requests)
    assert api.max_queued_requests == settings.serve.max_queued_requests == 64
    assert api.ray_actor_options["num_cpus"] == settings.serve.num_cpus
    assert api._deployment_config.health_check_period_s == settings.serve.health_check_period_s == 2
    assert (settings.serve.replicas, settings.serve.max_ongoing_requests, settings.serve.num_cpus) == (1, 16, 0)
    monkeypatch.setenv("ES_RAY_SERVE__REPLICAS", "3")
    monkeypatch.setenv("ES_RAY_SERVE__INGRESS", "proxy")  # more than one replica: behind Serve's proxy
    monkeypatch.setenv("ES_RAY_SERVE__NUM_CPUS", "0.5")
    scaled = search_api(deployment.app_args(load_settings(tmp_path / "state")))
    assert scaled.num_replicas == 3 and scaled.ray_actor_options["num_cpus"] == 0.5


def test_new_keys_or_limits_change_the_settings_version(tmp_path):
    base = load_settings(tmp_path / "state")
    new_key = base.model_copy(update={"auth": base.auth.model_copy(update={
        "api_keys": [ApiKeyEntry(name="ops", sha256="0" * 64)]})})
    new_limit = base.model_copy(update={"serve": base.serve.model_copy(update={"max_limit": 50})})
    version = deployment.app_args(base)["settings_version"]
    assert deployment.app_args(load_settings(tmp_path / "state"))["settings_version"] == version
    assert deployment.app_args(new_key)["settings_version"] != version
    assert deployment.app_args(new_limit)["settings_version"] != version


def test_direct_ingress_gives_the_one_replica_serve_port_and_more_replicas_need_the_proxy(monkeypatch, tmp_path):
    monkeypatch.setenv("ES_RAY_SERVE__PORT", "8123")
    monkeypatch.setenv("ES_RAY_SERVE__INGRESS", "direct")
    settings = load_settings(tmp_path / "state")
    env = deployment.direct_ingress_env(settings)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Ray's range is [min, max): serve.port and nothing else
    port_range = (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert port_range == ("8123", "8124")
    assert deployment.head_ingress(settings) == "direct:8123"
    assert search_api(deployment.app_args(settings)).ray_actor_options["resources"] == {"node:__internal_head__": 0.001}
    monkeypatch.setenv("ES_RAY_SERVE__INGRESS", "proxy")
    proxied = load_settings(tmp_path / "state")
    assert deployment.direct_ingress_env(proxied) == {} and deployment.head_ingress(proxied) == "proxy"
    assert "resources" not in search_api(deployment.app_args(proxied)).ray_actor_options
    monkeypatch.setenv("ES_RAY_SERVE__INGRESS", "direct")
    monkeypatch.setenv("ES_RAY_SERVE__REPLICAS", "2")
    with pytest.raises(ValidationError, match="serve.ingress: proxy"):
        load_settings(tmp_path / "state")
    # An external cluster (ray.address) serves through Serve's proxy whatever serve.ingress says.
    monkeypatch.setenv("ES_RAY_RAY__ADDRESS", "10.0.0.1:6379")
    external = load_settings(tmp_path / "state")
    assert not external.direct_ingress and deployment.direct_ingress_env(external) == {}


def test_the_app_status_reads_as_serve_names_it(monkeypatch):
    """`up` leaves a running app alone by its status: Serve's ApplicationStatus is a str enum whose str()
    is 'ApplicationStatus.RUNNING', so a comparison with 'RUNNING' must read its value (a running app
    once never looked running, and every `up` replaced it)."""
    from types import SimpleNamespace

    from ray import serve
    from ray.serve.schema import ApplicationStatus

    from es_ray.stack import control

    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(
        applications={"es-ray": SimpleNamespace(status=ApplicationStatus.RUNNING)}))
    assert control._app_status("es-ray") == "RUNNING"
    assert control._app_status("another") is None


def _port_with_a_closing_connection() -> int:
    """A port whose listener is gone and whose server side closed a connection first: that connection
    sits in TIME_WAIT, as a killed or replaced replica's connections do. The listener has SO_REUSEADDR, as
    the replica before had with port_reuse: Linux lets a socket bind over a closing connection only where
    both set it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()
    client.recv(1)  # the server's FIN
    client.close()
    listener.close()
    return port


def test_the_direct_ingress_replica_binds_its_port_over_closing_connections(monkeypatch):
    """Serve 2.60's replica server, as the replica starts it (`enable_so_reuseport=False`), cannot bind a
    port that a closing connection holds; with port_reuse it can, and still not a port that listens."""
    from ray.serve._private import http_util
    from ray.serve._private import replica as serve_replica
    from ray.serve.config import HTTPOptions

    from es_ray.serve import port_reuse

    monkeypatch.setattr(http_util, "set_socket_reuse_port", http_util.set_socket_reuse_port)
    monkeypatch.setattr(serve_replica, "start_asgi_http_server", serve_replica.start_asgi_http_server)

    async def asgi_app(scope, receive, send):
        raise AssertionError("no request is sent")

    async def start_and_stop(port: int) -> None:
        task, server = await serve_replica.start_asgi_http_server(
            asgi_app, HTTPOptions(host="127.0.0.1", port=port), event_loop=asyncio.get_running_loop(),
            enable_so_reuseport=False)
        server.should_exit = True
        await task

    port = _port_with_a_closing_connection()
    with pytest.raises(RuntimeError, match="Failed to bind") as unpatched:
        asyncio.run(start_and_stop(port))
    assert unpatched.value.__cause__.errno == errno.EADDRINUSE

    port_reuse.bind_replica_port_with_reuse_address()
    port_reuse.bind_replica_port_with_reuse_address()  # a second call wraps nothing twice
    asyncio.run(start_and_stop(_port_with_a_closing_connection()))

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        with pytest.raises(RuntimeError, match="Failed to bind"):
            asyncio.run(start_and_stop(listening.getsockname()[1]))
