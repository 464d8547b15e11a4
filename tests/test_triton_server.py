"""The embedded tritonserver on its own (no Ray, no Postgres): a tiny encoder served by the real server
from the nvidia-pytriton wheel, to check what keeps it from falling over."""

from __future__ import annotations

import concurrent.futures

import pytest

from es_ray.config import load_settings
from es_ray.inference import deploy
from es_ray.inference.triton_client import TritonEncoder, TritonUnavailable
from es_ray.stack import triton
from es_ray.stack.manifest import free_port
from es_ray.stack.supervisor import SHM_DIR
from tests.tiny_model import tiny_encoder_dir


@pytest.fixture()
def bounded_server(tmp_path):
    """A tritonserver whose encoders queue at most one request, with a tiny encoder as version 1."""
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
    assert len(regions) == 2, regions  # one region per stub (query and item encoder), named by this stack
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
    # Refused requests reach the caller as TritonUnavailable (a search answers 503 + Retry-After, errors.py).
    assert set(outcomes) == {"answered", "queue full"}, set(outcomes)
    triton.stop(state_dir)
    assert not list(SHM_DIR.glob(f"{triton.shm_prefix(state_dir)}*")), "regions left after stop"
