"""The load benchmark's memory figure: a page of a shared mapping that one process alone has touched is in
its USS (the kernel's private means mapped once), and the figure that leaves shared mappings out does not
count it; growth is reported per measure and per part of the stack, from kB (the MB are rounded to 0.1, and a
0.3 MB process's rounding alone would read as 33 %)."""

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


def sizes(own_kb: int | None, uss_kb: int | None, rss_kb: int | None) -> dict:
    """One process's sample as memory_mb gives it: kB, and MB rounded to 0.1."""
    kb = {"own": own_kb, "uss": uss_kb, "rss": rss_kb}
    return {**{m: None if v is None else round(v / 1024, 1) for m, v in kb.items()},
            **{f"{m}_kb": v for m, v in kb.items()}}


def test_growth_per_measure_and_per_part_of_the_stack():
    warm = {"postgres: backend [1]": sizes(2048, 3072, 20480),
            "ray::ServeReplica:es-ray:SearchAPI [2]": sizes(409600, 419840, 512000),
            "raylet [3]": sizes(None, None, None)}                          # gone at the warm sample
    end = {"postgres: backend [1]": sizes(2089, 6144, 40960),
           "ray::ServeReplica:es-ray:SearchAPI [2]": sizes(421888, 432128, 527360),
           "raylet [3]": sizes(5120, 5120, 5120)}
    report = growth_after_warmup(warm, end, 300)
    assert report["growth_measure"] == "own"
    assert report["max_growth_after_warmup_pct"] == 3.0 and report["max_growth_process"].startswith("ray::Serve")
    assert report["growth_by_measure"]["uss"]["max_pct"] == 100.0                  # the shared pages' growth
    assert report["growth_by_measure"]["own"]["max_by_group"]["postgres"]["pct"] == 2.0
    assert report["growth_by_measure"]["own"]["largest_mb"]["ray::ServeReplica:es-ray:SearchAPI [2]"] == 12.0
    assert "raylet [3]" not in report["growth_after_warmup_pct"]
    assert [group_of(n) for n in ("postgres: checkpointer  [9]", "stub query_encoder_v1 [8]", "raylet [3]",
                                  "ray::LifecycleDriver [7]", "python3.11 [6]")] == \
        ["postgres", "triton", "ray", "es-ray", "other"]


def test_growth_of_a_small_process_is_from_kb_not_from_the_rounded_mb():
    # 0.33 -> 0.35 MB reads 0.3 -> 0.3 MB (0 %), 0.34 -> 0.36 MB reads 0.3 -> 0.4 MB (33 %): both grew ~6 %
    for before_kb, after_kb in ((338, 358), (348, 368)):
        report = growth_after_warmup({"postgres: checkpointer  [9]": sizes(before_kb, before_kb, 9000)},
                                     {"postgres: checkpointer  [9]": sizes(after_kb, after_kb, 9000)}, 300)
        assert report["max_growth_after_warmup_pct"] == round(100 * (after_kb / before_kb - 1), 1)
        assert 5.0 < report["max_growth_after_warmup_pct"] < 6.0          # over the bound, and reported so
        assert report["growth_by_measure"]["own"]["largest_mb"]["postgres: checkpointer  [9]"] == 0.02
    # a real 40 kB growth of a 330 kB process is 12 %: no floor hides it
    report = growth_after_warmup({"p [1]": sizes(330, 330, 330)}, {"p [1]": sizes(370, 370, 370)}, 300)
    assert report["max_growth_after_warmup_pct"] == 12.1


def test_memory_mb_gives_kb_beside_the_rounded_mb():
    me = memory_mb({"me": psutil.Process()})["me"]
    for measure in ("own", "uss", "rss"):
        assert isinstance(me[f"{measure}_kb"], int) and me[f"{measure}_kb"] > 0
        assert me[measure] == round(me[f"{measure}_kb"] / 1024, 1)


def test_growth_by_half_tells_a_leak_from_a_cache_that_fills():
    series = {"leak [1]": [(0, 1000), (300, 1000), (600, 1100), (900, 1210)],      # kB: the same pace throughout
              "cache [2]": [(0, 1000), (300, 1000), (600, 1080), (900, 1081)],    # fills, then holds
              "gone [3]": [(0, 500), (300, None), (600, None), (900, None)],
              "short [4]": [(600, 100), (900, 100)]}                              # too few samples to split
    halves = growth_by_half(series, warmup_s=300)
    assert list(halves) == ["leak [1]", "cache [2]"]
    assert halves["leak [1]"] == {"first": 10.0, "second": 10.0, "whole": 21.0}
    assert halves["cache [2]"]["first"] == 8.0 and halves["cache [2]"]["second"] == 0.1
