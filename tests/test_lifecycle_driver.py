"""The lifecycle driver is a detached named actor; Ray restarts it and it reads its state back."""

import time

import ray

from es_ray.lifecycle.handle import DRIVER_NAME


def test_killed_driver_comes_back_with_its_state(stack, settings, api):
    ray.init(address=stack.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    try:
        driver = ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace)
        before = ray.get(driver.blue.remote())
        assert before["model_version"] == 1 and before["collection"] == "v1"
        ray.kill(driver, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
        deadline, after = time.monotonic() + 120, None
        while time.monotonic() < deadline and after is None:
            try:
                after = ray.get(ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace).blue.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
                time.sleep(1)
        assert after == before
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 60
    while api.get("/healthz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(1)
    assert api.get("/healthz").status_code == 200
    assert api.post("/v1/search", json={"query": "still serving"}).status_code == 200
