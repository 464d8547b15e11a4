"""Fusing a dense and a lexical ranking (es_ray/store/fusion.py), on plain lists."""

from __future__ import annotations

import pytest

from es_ray.store.fusion import Fusion, fuse


def test_reciprocal_rank_fusion_sums_weight_over_k_plus_rank():
    dense, lexical = [("a", 0.9), ("b", 0.8), ("c", 0.1)], [("c", 7.0), ("d", 3.0)]
    fused = {f.id: f for f in fuse(dense, lexical, Fusion("rrf", k=60, dense_weight=1.0, lexical_weight=2.0))}
    assert fused["a"].score == pytest.approx(1 / 61)
    assert fused["c"].score == pytest.approx(1 / 63 + 2 / 61)
    assert fused["d"].score == pytest.approx(2 / 62)
    assert (fused["c"].dense_rank, fused["c"].lexical_rank, fused["d"].dense_rank) == (3, 1, None)
    assert [f.id for f in fuse(dense, lexical, Fusion("rrf", k=60, lexical_weight=2.0))] == ["c", "d", "a", "b"]


def test_an_item_in_both_lists_beats_one_list_s_top_at_the_default_k():
    fused = fuse([("top", 1.0), ("both", 0.5)], [("x", 9.0), ("both", 4.0)], Fusion())
    assert fused[0].id == "both"


def test_ties_are_broken_by_id_whatever_the_input_order():
    # Rank 1 in one list only, in either list: equal scores.
    one = fuse([("b", 1.0)], [("a", 1.0)], Fusion())
    other = fuse([("a", 1.0)], [("b", 1.0)], Fusion())
    assert [f.id for f in one] == [f.id for f in other] == ["a", "b"]


def test_weighted_fusion_sums_min_max_normalised_scores():
    dense, lexical = [("a", 0.9), ("b", 0.7), ("c", 0.5)], [("c", 0.4), ("a", 0.2), ("d", 0.0)]
    fused = {f.id: f.score for f in fuse(dense, lexical, Fusion("weighted", dense_weight=1.0, lexical_weight=0.5))}
    assert fused == pytest.approx({"a": 1.0 + 0.5 * 0.5, "b": 0.5, "c": 0.0 + 0.5 * 1.0, "d": 0.0})


def test_an_empty_list_leaves_the_other_in_its_order():
    dense = [("x", 0.3), ("y", 0.2), ("z", 0.2)]
    for method in ("rrf", "weighted"):
        assert [f.id for f in fuse(dense, [], Fusion(method))] == ["x", "y", "z"]
        assert [f.id for f in fuse([], dense, Fusion(method))] == ["x", "y", "z"]
    assert fuse([], [], Fusion()) == []
