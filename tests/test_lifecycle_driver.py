"""The lifecycle driver is a detached named actor; Ray restarts it and it reads its state back."""

import time

import pytest
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


def test_a_deployed_copy_is_undeployed_and_a_live_version_is_not(stack, settings, api):
    """`make load`'s deploy cycles (es_ray/bench/load.py): a new version deployed beside blue, then undeployed
    through the driver; blue itself is refused, and search answers throughout."""
    from es_ray.bench.load import copy_of_blue
    from es_ray.lifecycle.switching import SwitchRefused
    from es_ray.store import blue_green, db

    ray.init(address=stack.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    try:
        driver = ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace)
        blue = ray.get(driver.blue.remote())["model_version"]
        version = copy_of_blue(settings, blue, 0)
        assert ray.get(driver.deploy_version.remote(version))["version"] == version
        assert api.post("/v1/search", json={"query": "a search beside a new version"}).status_code == 200
        assert ray.get(driver.undeploy_version.remote(version)) == {"undeployed": version}
        with pytest.raises(SwitchRefused, match="is live"):
            ray.get(driver.undeploy_version.remote(blue))
    finally:
        ray.shutdown()
    with db.connect(stack.postgres_dsn) as conn:
        assert blue_green.get_model(conn, version).state == "retired"
        assert blue_green.get_model(conn, blue).state != "retired"
    assert api.post("/v1/search", json={"query": "still serving blue"}).status_code == 200


def test_the_driver_reuses_its_connections(stack, settings):
    """A call that reads Postgres does not open a connection of its own: each costs Postgres a backend, and
    pgvector's register_vector leaves eight adapter classes behind in the driver for every connection (the
    driver grew 0.4 MB a minute under load before it pooled them)."""
    from es_ray.store import db

    def sessions_opened() -> int:  # every connection Postgres has accepted to this database, ever
        with db.connect(stack.postgres_dsn) as conn:
            return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
                                ).fetchone()[0]

    ray.init(address=stack.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    try:
        driver = ray.get_actor(DRIVER_NAME, namespace=settings.ray.namespace)
        ray.get([driver.status.remote() for _ in range(4)])   # the pool opens what it needs once
        before = sessions_opened()
        for _ in range(40):
            assert ray.get(driver.status.remote())["blue"] is not None
        opened = sessions_opened() - before - 1                # less the one sessions_opened itself opened
    finally:
        ray.shutdown()
    assert opened <= 4, f"40 calls opened {opened} connections"   # a loop of the driver may open one meanwhile
