"""The vector adjuster and session labelling on plain arrays (no stack)."""

import numpy as np

from es_ray.improve.adjuster import CLICKED, IRRELEVANT, SKIPPED, AdjusterConfig, Examples, VectorAdjuster
from es_ray.improve.loop import adjustment_examples, labelled
from es_ray.store.clickstream import LoggedSession


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


rng = np.random.default_rng(0)
Q = unit(rng.normal(size=8)).astype(np.float32)
V = unit(rng.normal(size=(3, 8))).astype(np.float32)


def test_clicked_chunk_moves_towards_its_query_and_skipped_away():
    # the skipped result was ranked above the clicked one: its vector is closer to the query
    vectors = np.stack([V[0], unit(Q + 0.5 * V[1]), V[2]]).astype(np.float32)
    ex = Examples(queries=np.stack([Q, Q]), chunk=np.array([0, 1]), kind=np.array([CLICKED, SKIPPED]),
                  best_click=np.array([-1, 0]))
    before = vectors @ Q
    assert before[1] > before[0]
    after_vectors = VectorAdjuster().adjust(vectors, vectors, ex)
    after = after_vectors @ Q
    assert after[0] > before[0] + 0.05           # clicked: closer to the query
    assert after[1] < before[1]                  # skipped above it: further away
    assert after[1] - after[0] < before[1] - before[0]  # the wrong order is (partly) repaired
    assert np.allclose(after_vectors[2], V[2])   # untouched vectors stay
    assert np.allclose(np.linalg.norm(after_vectors, axis=1), 1, atol=1e-5)


def test_irrelevant_results_move_away_and_the_anchor_bounds_the_drift():
    ex = Examples(np.stack([Q] * 3), np.array([0, 1, 2]), np.array([IRRELEVANT] * 3), np.array([-1] * 3))
    high = unit(Q + 0.3 * V).astype(np.float32)  # all well above the floor
    loose = VectorAdjuster(AdjusterConfig(anchor=0.0, irrelevant_floor=-1)).adjust(high, high, ex)
    tight = VectorAdjuster(AdjusterConfig(anchor=50.0, irrelevant_floor=-1)).adjust(high, high, ex)
    assert ((loose @ Q) < (high @ Q)).all()
    assert (np.linalg.norm(tight - high, axis=1) < np.linalg.norm(loose - high, axis=1)).all()


def test_no_examples_changes_nothing():
    empty = Examples(np.zeros((0, 8), np.float32), np.zeros(0, int), np.zeros(0, int), np.zeros(0, int))
    assert np.array_equal(VectorAdjuster().adjust(V, V, empty), V)


def test_labelling_skip_above_and_irrelevant():
    shown = [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    assert labelled(LoggedSession("s", "q", False, None, shown, {"c"})) == [("c", CLICKED), ("a", SKIPPED),
                                                                            ("b", SKIPPED)]
    assert labelled(LoggedSession("s", "q", True, None, shown, set())) == [(i, IRRELEVANT) for _, i in shown]
    assert labelled(LoggedSession("s", "q", False, None, shown, set())) == []


def test_examples_use_each_items_best_matching_chunk_and_sessions_of_any_shape():
    far, near = unit(-Q), Q
    chunks = {"a": [(1, V[0]), (2, near)], "b": [(1, far)], "c": [(1, V[1])]}
    sessions = [LoggedSession("s1", "q", False, None, [(1, "b"), (2, "a")], {"a"}),
                LoggedSession("s2", "q", False, None, [(1, "c"), (2, "b"), (3, "a")], {"a", "c"}),
                LoggedSession("s3", "q", True, None, [(1, "c")], set())]
    keys, vectors, ex = adjustment_examples(sessions, {"s1": Q, "s2": Q, "s3": Q}, chunks)
    assert ("a", 2) in keys and ("a", 1) not in keys   # the chunk that matched the query
    assert len(vectors) == len(keys) == 3
    kinds = list(ex.kind)
    assert kinds.count(CLICKED) == 3 and kinds.count(SKIPPED) == 2 and kinds.count(IRRELEVANT) == 1
    for i in np.where(ex.kind == SKIPPED)[0]:
        assert ex.kind[ex.best_click[i]] == CLICKED
