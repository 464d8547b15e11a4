"""The embedded tritonserver on its own (no Ray, no Postgres): a tiny encoder served by the real server
from the nvidia-pytriton wheel, to check what keeps it from falling over."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import psutil
import pytest

from es_ray.config import load_settings
from es_ray.inference import deploy, triton_repo
from es_ray.inference.triton_client import TritonEncoder, TritonUnavailable
from es_ray.lifecycle.version_servers import VersionServers
from es_ray.stack import triton
from es_ray.stack.manifest import free_port
from es_ray.stack.supervisor import SHM_DIR
from tests.tiny_model import tiny_encoder_dir


@pytest.fixture()
def bounded_server(tmp_path):
    """A tritonserver whose item encoder queues at most one request (the query encoder has no queue
    policy: triton_repo.bounded_queue), with a tiny encoder as version 1."""
    settings = load_settings()
    settings.triton.max_queue_size = 1
    http_port, grpc_port = free_port(), free_port()
    triton.start(tmp_path, settings, http_port, grpc_port, free_port())
    try:
        model_dir = tiny_encoder_dir(tmp_path / "tiny")
        deploy.deploy(settings, triton.model_repository(tmp_path), f"127.0.0.1:{http_port}", 1, model_dir,
                      triton.control_headers(tmp_path))
        yield tmp_path, f"127.0.0.1:{grpc_port}", model_dir
    finally:
        triton.stop(tmp_path)


def test_a_full_queue_refuses_at_once_and_shared_memory_is_the_stacks_own(bounded_server):
    state_dir, grpc_url, model_dir = bounded_server
    regions = sorted(p.name for p in SHM_DIR.glob(f"{triton.shm_prefix(state_dir)}*"))
    stubs = load_settings().triton.instances + load_settings().triton.item_instances
    assert len(regions) == stubs, regions  # one region per stub (each encoder instance), named by this stack
    encoder = TritonEncoder(grpc_url, "item_encoder", 1, str(model_dir), 128)
    texts = ["word " * 100] * 64

    def embed(_):
        try:
            encoder.embed_chunks(texts, 0, 1)
            return "answered"
        except TritonUnavailable as err:
            return "queue full" if "Exceeds maximum queue size" in str(err) else str(err)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(embed, range(32)))
    # Refused requests reach the caller as TritonUnavailable (an upsert answers 503 + Retry-After, errors.py).
    assert set(outcomes) == {"answered", "queue full"}, set(outcomes)
    triton.stop(state_dir)
    assert not list(SHM_DIR.glob(f"{triton.shm_prefix(state_dir)}*")), "regions left after stop"


def test_a_killed_version_server_comes_back_with_its_models_while_another_keeps_answering(tmp_path):
    settings = load_settings()
    servers = VersionServers(settings, tmp_path)
    try:
        model_dirs = {1: tiny_encoder_dir(tmp_path / "tiny-1", seed=1), 2: tiny_encoder_dir(tmp_path / "tiny-2", seed=2)}
        address = {version: servers.deploy(version, model_dirs[version]) for version in (1, 2)}
        assert address[1]["grpc"] != address[2]["grpc"]
        killed = triton.server_pid(tmp_path, 1)
        stubs = sorted(p.pid for p in psutil.Process(killed).children())
        assert len(stubs) == settings.triton.instances + settings.triton.item_instances, stubs  # one per instance
        assert servers.deploy(1, model_dirs[1]) == address[1]  # deployed already: the same server ...
        assert sorted(p.pid for p in psutil.Process(killed).children()) == stubs  # ... and nothing reloaded
        old_regions = set(SHM_DIR.glob(f"{triton.shm_prefix(tmp_path, 1)}*"))
        assert len(old_regions) == len(stubs) and not old_regions & set(SHM_DIR.glob(f"{triton.shm_prefix(tmp_path, 2)}*"))
        other = TritonEncoder(address[2]["grpc"], "query_encoder", 2, str(model_dirs[2]), 64)
        stop, answered, failed = threading.Event(), [], []

        def search_v2():
            while not stop.is_set():
                try:
                    other.embed_queries(["a query for the version that was not killed"])
                    answered.append(time.monotonic())
                except TritonUnavailable as err:
                    failed.append(str(err))

        searcher = threading.Thread(target=search_v2)
        searcher.start()
        try:
            os.kill(killed, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while triton.server_pid(tmp_path, 1) in (None, killed) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert triton.server_pid(tmp_path, 1) not in (None, killed), "the supervisor did not restart v1's server"
            killed_at = time.monotonic()
            # Nobody loads anything: the restarted server has v1's encoders on its command line.
            deploy.wait_ready(address[1]["http"], 1, timeout_s=120)
        finally:
            stop.set()
            searcher.join()
        assert not failed, failed[:3]
        assert answered and answered[-1] > killed_at, "v2 stopped answering while v1 was restarted"
        assert not old_regions & set(SHM_DIR.glob(f"{triton.shm_prefix(tmp_path, 1)}*")), "the dead server's shm is left"
        restarted = TritonEncoder(address[1]["grpc"], "query_encoder", 1, str(model_dirs[1]), 64)
        assert restarted.embed_queries(["back again"]).shape == (1, 32)
        servers.undeploy(1)
        assert triton.running_pid(tmp_path, 1) is None and not triton_repo.has_version(servers.repo, 1)
        assert not list(SHM_DIR.glob(f"{triton.shm_prefix(tmp_path, 1)}*"))
        assert triton.versions_running(tmp_path) == [2]
    finally:
        stopped = triton.stop_all(tmp_path)
    assert stopped == ["triton-v2"] and not list(SHM_DIR.glob(f"{triton.shm_prefix(tmp_path)[:-len('stack_')]}*"))
