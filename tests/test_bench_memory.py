"""The load benchmark's memory figure: a page of a shared mapping that one process alone has touched is in
its USS (the kernel's private means mapped once), and the figure that leaves shared mappings out does not
count it; growth is reported per measure and per part of the stack."""

from __future__ import annotations

import mmap
import os

import psutil

from es_ray.bench.load import group_of, growth_after_warmup, growth_by_half, memory_mb, private_kb

MB = 2**20


def test_shared_pages_one_process_touched_are_in_uss_but_not_in_own_memory():
    before_uss, before_shared = private_kb(os.getpid())
    region = mmap.mmap(-1, 32 * MB, flags=mmap.MAP_SHARED)   # what Postgres's shared buffers are
    for offset in range(0, len(region), mmap.PAGESIZE):
        region[offset] = 1
    uss, in_shared = private_kb(os.getpid())
    assert in_shared - before_shared >= 30 * 1024           # kB: the 32 MB this process alone maps
    assert uss - before_uss >= 30 * 1024
    assert abs(uss - psutil.Process().memory_full_info().uss / 1024) < 2 * 1024   # the same USS as psutil's
    sizes = memory_mb({"me": psutil.Process()})["me"]
    assert sizes["uss"] - sizes["own"] >= 30                 # MB
    region.close()


def test_growth_per_measure_and_per_part_of_the_stack():
    warm = {"postgres: backend [1]": {"own": 2.0, "uss": 3.0, "rss": 20.0},
            "ray::ServeReplica:es-ray:SearchAPI [2]": {"own": 400.0, "uss": 410.0, "rss": 500.0},
            "raylet [3]": {"own": None, "uss": None, "rss": None}}            # gone at the warm sample
    end = {"postgres: backend [1]": {"own": 2.04, "uss": 6.0, "rss": 40.0},
           "ray::ServeReplica:es-ray:SearchAPI [2]": {"own": 412.0, "uss": 422.0, "rss": 515.0},
           "raylet [3]": {"own": 5.0, "uss": 5.0, "rss": 5.0}}
    report = growth_after_warmup(warm, end, 300)
    assert report["growth_measure"] == "own"
    assert report["max_growth_after_warmup_pct"] == 3.0 and report["max_growth_process"].startswith("ray::Serve")
    assert report["growth_by_measure"]["uss"]["max_pct"] == 100.0                  # the shared pages' growth
    assert report["growth_by_measure"]["own"]["max_by_group"]["postgres"]["pct"] == 2.0
    assert "raylet [3]" not in report["growth_after_warmup_pct"]
    assert [group_of(n) for n in ("postgres: checkpointer  [9]", "stub query_encoder_v1 [8]", "raylet [3]",
                                  "ray::LifecycleDriver [7]", "python3.11 [6]")] == \
        ["postgres", "triton", "ray", "es-ray", "other"]


def test_growth_by_half_tells_a_leak_from_a_cache_that_fills():
    series = {"leak [1]": [(0, 100.0), (300, 100.0), (600, 110.0), (900, 121.0)],      # the same pace throughout
              "cache [2]": [(0, 100.0), (300, 100.0), (600, 108.0), (900, 108.1)],    # fills, then holds
              "gone [3]": [(0, 50.0), (300, None), (600, None), (900, None)],
              "short [4]": [(600, 10.0), (900, 10.0)]}                              # too few samples to split
    halves = growth_by_half(series, warmup_s=300)
    assert list(halves) == ["leak [1]", "cache [2]"]
    assert halves["leak [1]"] == {"first": 10.0, "second": 10.0, "whole": 21.0}
    assert halves["cache [2]"]["first"] == 8.0 and halves["cache [2]"]["second"] == 0.1
