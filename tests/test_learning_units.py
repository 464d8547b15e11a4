"""Units of learning from clicks on plain tensors and small hand-made logs: the collection softmax,
weight averaging, corpus pseudo-queries, swaps, examination harvested from swaps, click memories."""

import random

import numpy as np
import pytest
import torch

from es_ray.demo.users import ClickModel, simulate_log
from es_ray.improve.memory import item_memories, remembered
from es_ray.inference.encoder import item_tower_fingerprint
from es_ray.serve.exploration import choose_swap, swapped
from es_ray.train.corpus_queries import corpus_queries, sentences
from es_ray.train.losses import CollectionSoftmaxLoss, item_scores
from es_ray.train.propensity import propensities
from es_ray.train.weight_averaging import interpolate

THETA = [0.81, 0.56, 0.46, 0.39, 0.29, 0.26, 0.24, 0.20, 0.20, 0.19]


def test_item_scores_take_each_items_best_chunk():
    chunks = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    owner = torch.tensor([0, 0, 1])
    scores = item_scores(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), chunks, owner, 2)
    assert torch.allclose(scores, torch.tensor([[1.0, 0.8], [1.0, 0.6]]))


def test_collection_softmax_is_cross_entropy_over_items_not_excluded():
    scores = torch.tensor([[0.9, 0.5, 0.8, 0.1]])
    loss = CollectionSoftmaxLoss(scale=10.0)
    plain = loss.compute_loss_from_scores(scores, torch.tensor([1]))
    expected = -torch.log_softmax(scores * 10, dim=1)[0, 1]
    assert torch.isclose(plain, expected)
    # Excluding the two items above the positive leaves it nearly alone: the loss falls, and the
    # positive itself is never excluded even when the mask says so.
    mask = torch.tensor([[True, True, True, False]])
    without = loss.compute_loss_from_scores(scores, torch.tensor([1]), mask)
    assert without < plain
    assert torch.isclose(without, -torch.log_softmax(torch.tensor([5.0, 1.0]), dim=0)[0])


def test_collection_softmax_gradient_moves_the_query_towards_its_positive():
    chunks = torch.nn.functional.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    owner = torch.arange(50)
    q = torch.nn.functional.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    q.requires_grad_(True)
    loss_fn = CollectionSoftmaxLoss(scale=20.0)
    before = float(q.detach() @ chunks[7])
    for _ in range(50):
        loss = loss_fn(torch.nn.functional.normalize(q, dim=1), chunks, owner, 50, torch.tensor([7]))
        loss.backward()
        with torch.no_grad():
            q -= 0.05 * q.grad
            q.grad = None
    scores = torch.nn.functional.normalize(q.detach(), dim=1) @ chunks.T
    assert float(scores[0, 7]) > before and int(scores.argmax()) == 7


def test_weight_averaging_interpolates_floats_and_keeps_integer_buffers():
    parent = {"w": torch.zeros(3), "ids": torch.tensor([1, 2])}
    tuned = {"w": torch.ones(3), "ids": torch.tensor([1, 2])}
    mixed = interpolate(parent, tuned, 0.25)
    assert torch.allclose(mixed["w"], torch.full((3,), 0.25)) and torch.equal(mixed["ids"], tuned["ids"])
    assert torch.allclose(interpolate(parent, tuned, 1.0)["w"], tuned["w"])
    with pytest.raises(ValueError):
        interpolate(parent, tuned, 1.5)
    with pytest.raises(ValueError):
        interpolate(parent, {"w": torch.ones(3)}, 0.5)


def test_corpus_queries_take_the_first_sentence_and_others_of_query_length():
    text = ("Statins lower LDL cholesterol in adults. We measured it. Patients on statins had fewer "
            "cardiac events over five years. " + "word " * 80 + ".")
    assert sentences(text) == ["Statins lower LDL cholesterol in adults.",
                               "Patients on statins had fewer cardiac events over five years."]
    pseudo = corpus_queries({"d1": text, "d2": "too short", "d3": "Another item about glaciers melting fast."},
                            per_item=2, seed=1)
    assert pseudo.items == ["d1", "d1", "d3"]
    assert pseudo.texts[0] == "Statins lower LDL cholesterol in adults." and pseudo.texts[1].startswith("Patients")


def test_swaps_exchange_one_adjacent_pair_within_reach_and_keep_every_result():
    rng = random.Random(3)
    results = list("abcdefghijkl")
    chosen = [choose_swap(len(results), 0.5, 10, rng) for _ in range(4000)]
    swaps = [r for r in chosen if r is not None]
    assert 0.45 < len(swaps) / len(chosen) < 0.55
    assert set(swaps) == set(range(1, 10))                  # pairs (1,2) .. (9,10), never beyond rank 10
    shown = swapped(results, 4)
    assert shown[:5] == list("abced") and sorted(shown) == results and results == list("abcdefghijkl")
    assert choose_swap(1, 1.0, 10, rng) is None and swapped(results, None) == results
    assert all(choose_swap(10, 0.0, 10, rng) is None for _ in range(100))


def _log(sessions_per_query: int, swap_share: float, seed: int = 1):
    rng = random.Random(seed)
    queries = {f"q{i}": f"query {i}" for i in range(400)}
    shown = {q: [f"{q}-d{r}" for r in range(10)] for q in queries}
    qrels = {q: {f"{q}-d{r}": 1 for r in range(10) if rng.random() < 0.5 * 0.85 ** r} for q in queries}
    model = ClickModel(THETA, 0.9, 0.1, sessions_per_query, 13)
    return simulate_log(queries, shown, qrels, model, seed, swap_share)


def test_examination_is_harvested_from_swapped_pairs_and_overrules_a_wrong_prior_given_enough_log():
    truth = np.asarray(THETA) / THETA[0]
    flattened = list(THETA[0] * (truth + 0.2 * (1 - truth)))   # the ratios to rank 1 flattened by 20 %
    estimate = propensities(_log(150, 0.5), flattened, "estimate", min_rank_variation=50)
    assert estimate.source == "estimate" and estimate.details["max_ratio_difference_from_prior"] > 0.05
    ratios = estimate.by_rank / estimate.by_rank[0]
    assert np.abs(ratios - truth).max() < 0.06, (ratios.round(3), truth.round(3))
    assert np.abs(ratios - truth).max() < np.abs(np.asarray(flattened) / flattened[0] - truth).max()


def test_without_swaps_the_prior_is_kept_and_says_why():
    chosen = propensities(_log(5, 0.0), THETA, "estimate", min_rank_variation=50)
    assert chosen.source == "config" and "more than one rank" in chosen.details["reason"]
    assert propensities(_log(5, 0.5), THETA, "config", 50).source == "config"


def test_click_memories_weigh_evidence_and_move_an_item_towards_its_queries():
    q1, q2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    memories = item_memories({"a": q1, "b": q2}, {("a", "x"): 0.9, ("b", "x"): 0.1, ("a", "y"): 0.0})
    assert set(memories) == {"x"}                        # zero evidence makes no memory
    assert memories["x"].evidence == pytest.approx(1.0)
    assert memories["x"].vector[0] > 8 * memories["x"].vector[1]
    chunk = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
    strong = remembered(chunk, memories["x"], weight=0.5, evidence_half=0.0)
    weak = remembered(chunk, memories["x"], weight=0.5, evidence_half=9.0)   # evidence 1 of 10: a tenth of it
    assert np.isclose(np.linalg.norm(strong), 1.0) and strong[0] @ q1 > weak[0] @ q1 > 0


def test_item_tower_fingerprint_covers_weights_and_tokenizer_and_needs_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "query_encoder").mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "vocab.txt").write_text("[PAD]\nhello\n")
    assert item_tower_fingerprint(a) is None                        # no weights: never "the same tower"
    for d in (a, b):
        (d / "model.safetensors").write_bytes(b"weights")
    (b / "query_encoder" / "model.safetensors").write_bytes(b"tuned query tower")
    assert item_tower_fingerprint(a) == item_tower_fingerprint(b)   # only the query tower differs
    (b / "vocab.txt").write_text("[PAD]\nworld\n")
    assert item_tower_fingerprint(a) != item_tower_fingerprint(b)
