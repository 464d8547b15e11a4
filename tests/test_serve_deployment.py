"""How `es-ray up` deploys the API, without a stack: the options come from configs/stack.yaml
(environment overrides included), and any settings change gives the deployment a new settings version."""

from es_ray.config import ApiKeyEntry, load_settings
from es_ray.serve import deployment
from es_ray.serve.app import search_api


def test_the_deployment_takes_its_options_from_stack_yaml(monkeypatch, tmp_path):
    settings = load_settings(tmp_path / "state")
    api = search_api(deployment.app_args(settings))
    assert (api.num_replicas, api.max_ongoing_requests) == (settings.serve.replicas, settings.serve.max_ongoing_requests)
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
