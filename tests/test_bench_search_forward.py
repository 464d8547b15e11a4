"""The search benchmark's model-speed side, on a tiny encoder: the forward pass it times is the TorchScript
file Triton serves, and the batch Triton formed is read from its statistics' counts."""

from __future__ import annotations

import os

import torch

from es_ray.bench.search import cpu_per_request, fastest_forward, formed_batch
from es_ray.inference.encoder import load_encoder, trace
from tests.tiny_model import tiny_encoder_dir


def test_formed_batch_is_rows_per_forward_pass_between_two_readings():
    assert formed_batch((100, 40), (160, 55)) == 4.0
    assert formed_batch((7, 7), (7, 7)) == 1.0  # nothing ran: one row per pass, not a division by zero


def test_fastest_forward_times_the_served_torchscript_at_the_formed_batch(tmp_path):
    model_dir = tiny_encoder_dir(tmp_path / "tiny")
    path = tmp_path / "model.pt"
    torch.jit.save(trace(load_encoder(model_dir)), str(path))
    threads_before = torch.get_num_threads()
    queries = [f"query number {i} about wings and lift" for i in range(12)]
    result = fastest_forward(path, str(model_dir), 64, 16, queries, batch=2.6)
    assert result["batch"] == 3
    assert result["query_ms"] > 0
    # the limit is the fastest pass, whatever the stub runs: 1 thread and every core, the faster counts
    assert result["query_ms"] == min(result["query_ms_by_threads"].values())
    assert result["queries_per_s"] == max(result["queries_per_s_by_threads"].values())
    for threads in (1, os.cpu_count()):
        assert threads in result["queries_per_s_by_threads"] and threads in result["query_ms_by_threads"]
    assert torch.get_num_threads() == threads_before  # the benchmark process keeps its own thread setting


def test_cpu_per_request_is_each_roles_cpu_between_two_readings_over_the_requests():
    before = {1: ("serve proxy", 10.0), 2: ("postgres", 5.0), 3: ("postgres", 1.0)}
    after = {1: ("serve proxy", 10.5), 2: ("postgres", 5.2), 3: ("postgres", 1.1), 4: ("tritonserver", 0.4)}
    # A process that started between the readings counts from zero; one that ended counts nothing.
    assert cpu_per_request(before, after, 100) == {"total": 12.0, "serve proxy": 5.0, "tritonserver": 4.0,
                                                   "postgres": 3.0}
