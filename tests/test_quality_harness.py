"""The offline quality harness end to end on a tiny encoder and a generated collection: the same
example building, training and click memories as the jobs, every report the benchmark writes."""

import json
import os
import random

import pytest

from es_ray.bench.corpus_vectors import _fingerprint
from es_ray.bench.quality import Plan, measure
from es_ray.bench.quality_harness import Dataset, Harness
from es_ray.config import MemorySettings
from es_ray.train.config import load_finetune_config
from tests.tiny_model import tiny_encoder_dir

TOPICS = ["volcano", "glacier", "protein", "galaxy", "river", "vaccine", "neuron", "crystal"]


def generated_collection(root):
    """Eight topics of six items; three train and one test query per topic, each judging two items."""
    rng = random.Random(3)
    (root / "qrels").mkdir(parents=True)
    corpus, queries, train, test = [], [], [], []
    for t, topic in enumerate(TOPICS):
        for k in range(6):
            corpus.append({"_id": f"{topic}-{k}", "title": f"{topic} study {k}",
                           "text": f"Findings on the {topic} number {k}. The {topic} was measured in {k + 2} sites."})
        for n in range(4):
            qid = f"{topic}-q{n}"
            queries.append({"_id": qid, "text": f"what is known about {topic} {n}"})
            (test if n == 3 else train).extend((qid, f"{topic}-{d}") for d in rng.sample(range(6), 2))
    (root / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for name, pairs in (("train", train), ("test", test)):
        (root / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                     "".join(f"{q}\t{d}\t1\n" for q, d in pairs))
    return root


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    data = generated_collection(root / "tiny-beir")
    model_dir = tiny_encoder_dir(root / "tiny-encoder")
    dataset = Dataset.load(data, model_dir, max_length=32, overlap=8, max_chunks=4, cache_dir=root / "cache")
    config = load_finetune_config(overrides={
        "data": {"min_train_examples": 1, "min_heldout_queries": 1, "heldout_fraction": 0.3},
        "train": {"max_steps": 4, "eval_every_steps": 2, "corpus_share": 0.5},
        "trial": {"batch_size": 8, "epochs": 1}})
    harness = Harness(dataset, config, MemorySettings(), swap_share=0.5, swap_max_rank=10, model_dir=model_dir)
    lines = []
    result = measure(dataset, harness, config, Plan([0.1], [0, 1], [0], ["naive", "debiased"], skylines=True,
                                                    propensity_sessions_per_query=(5,)), progress=lines.append)
    return dataset, harness, result, lines


def test_every_run_and_mean_is_reported(measured):
    dataset, harness, result, lines = measured
    assert result["test_queries"] == 8 and result["train_queries"] == 24 and result["docs"] == 48
    assert 0 < result["validation_queries"] < 24
    runs = [line for line in lines if "method" in line]
    assert sorted((r["click_seed"], r["method"]) for r in runs) == [(0, "debiased"), (0, "naive"),
                                                                     (1, "debiased"), (1, "naive")]
    entry = result["by_noise"]["0.1"]
    for method in ("naive", "debiased"):
        for part in ("tower", "system"):
            scores = entry[method][part]
            assert {"ndcg@10", "mrr@10", "recall@100", "val_ndcg@10", "train_ndcg@10"} <= set(scores)
            assert all(0 <= scores[k] <= 1 for k in ("ndcg@10", "mrr@10", "recall@100"))
            mean = sum(r[part]["ndcg@10"] for r in runs if r["method"] == method) / 2
            assert scores["ndcg@10"] == pytest.approx(mean, abs=1e-4)    # the mean over click seeds
    assert 0 <= entry["paired_p"] <= 1
    low, high = entry["paired_tower"]["bootstrap_95"]
    assert low <= entry["paired_tower"]["mean_difference"] <= high
    assert {"shown_qrels", "all_qrels"} == set(result["skylines"])
    assert len(result["gate"]["points"]) == 2 and len(result["gate"]["checks"]) == 4
    # the worse models: 12 noisy copies of the blue model per click log, each judged by the gate
    worse = result["gate"]["worse_checks"]
    assert len(worse) == 12 * len(result["gate"]["points"]) and {c["sd"] for c in worse} == {0.01, 0.02, 0.03, 0.05}
    assert result["gate"]["of_them_refused"] == sum(not c["passed"] for c in worse if c["test_gain"] <= -0.01)
    assert result["propensity"]["by_sessions_per_query"]["5"]["sessions"] == 5 * 24


def test_test_queries_never_click_and_validation_queries_never_train(measured):
    dataset, harness, _, _ = measured
    log = harness.click_log(0.1, 13)
    clicked_queries = {s.query for s in log}
    assert clicked_queries <= set(dataset.train.values())
    assert clicked_queries.isdisjoint(dataset.test.values())
    assert harness.val and {dataset.train[q] for q in harness.val} <= clicked_queries
    from es_ray.train.clicklog import SessionBatch
    from es_ray.train.finetune import prepare

    data, _ = prepare(SessionBatch(log), dataset.items, dataset.texts, harness.parent, harness.config)
    assert set(data.queries).isdisjoint({dataset.train[q] for q in harness.val})
    assert set(data.heldout_queries.values()) <= {dataset.train[q] for q in harness.val}


def test_the_harness_learns_through_the_configured_learning_guards(measured):
    """Each simulated session is a person of its own, and what the harness learns from passed the guards
    the stack applies (configs/stack.yaml `learning:`): no clicked pair with fewer clients than that."""
    from es_ray.config import load_settings
    from es_ray.demo.users import ClickModel, simulate_log
    from es_ray.train.learning_guards import clicking_clients

    dataset, harness, _, _ = measured
    assert harness.guards == load_settings().learning
    raw = simulate_log(dataset.train, harness.shown, dataset.train_qrels, ClickModel.load().with_noise(0.1), 13,
                       harness.swap_share, harness.swap_max_rank)
    assert len({s.learning_client for s in raw}) == len(raw)
    lone = [pair for pair, clients in clicking_clients(raw).items() if len(clients) < harness.guards.min_clients]
    assert lone                                                  # the raw log has pairs too few people clicked ...
    learned = clicking_clients(harness.click_log(0.1, 13))
    assert learned and min(len(c) for c in learned.values()) >= harness.guards.min_clients
    assert not set(lone) & set(learned)                          # ... and the harness does not learn from them


def test_vector_cache_is_keyed_by_content_not_modification_time(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    corpus = tmp_path / "a" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text('{"_id": "d1", "text": "one"}\n')
    key = _fingerprint(corpus, model_dir, 32, 8, 4)
    copy = tmp_path / "b" / "corpus.jsonl"                 # the same collection copied elsewhere, later
    copy.parent.mkdir()
    copy.write_text(corpus.read_text())
    os.utime(copy, (1, 1))
    assert _fingerprint(copy, model_dir, 32, 8, 4) == key
    copy.write_text('{"_id": "d1", "text": "two"}\n')
    assert _fingerprint(copy, model_dir, 32, 8, 4) != key
    assert _fingerprint(corpus, model_dir, 64, 8, 4) != key
