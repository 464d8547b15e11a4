"""How `es-ray up` deploys the API, without a stack: the options come from configs/stack.yaml
(environment overrides included), and any settings change gives the deployment a new settings version."""

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
    assert (settings.serve.replicas, settings.serve.max_ongoing_requests, settings.serve.num_cpus) == (1, 16, 0)
    monkeypatch.setenv("ES_RAY_SERVE__REPLICAS", "3")
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
