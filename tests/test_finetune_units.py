"""Fine-tuning parts on plain data: query split, propensity estimate, click weighting, gate, config."""

import random
from datetime import datetime, timezone

import numpy as np
import pytest
from pydantic import ValidationError

from es_ray.store.clickstream import LoggedSession
from es_ray.train.clicklog import is_heldout, split_by_query
from es_ray.train.config import DebiasConfig, GateConfig, load_finetune_config
from es_ray.train.examples import build_examples, heldout_labels, relevance_posterior
from es_ray.train.gate import decide
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.propensity import Impressions, Propensities, propensities

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
THETA = np.array([0.9, 0.6, 0.45, 0.35, 0.3, 0.25, 0.2, 0.18, 0.16, 0.15])


def session(query, shown, clicked=(), irrelevant=False, sid=None):
    return LoggedSession(sid or f"s{random.random()}", query, irrelevant, NOW,
                         [(r, item) for r, item in enumerate(shown, start=1)], set(clicked))


def simulate(rng, queries=60, sessions=20, shuffle=True, gamma_rel=0.9, gamma_noise=0.1):
    """Sessions of a position-based click model; `shuffle` varies the ranking of each session."""
    log, relevant = [], {}
    for q in range(queries):
        items = [f"q{q}-d{i}" for i in range(10)]
        relevant[q] = set(rng.sample(items, 2))
        for _ in range(sessions):
            shown = rng.sample(items, 10) if shuffle else items
            clicked = [d for r, d in enumerate(shown) if rng.random() < THETA[r] *
                       (gamma_rel if d in relevant[q] else gamma_noise)]
            log.append(session(f"query {q}", shown, clicked))
    return log, relevant


def test_split_is_by_query_text_seeded_and_never_leaks():
    sessions = [session(q, ["a"], ["a"]) for q in [f"Query {i}" for i in range(300)] * 3]
    sessions += [session("  QUERY 5 ", ["a"]), session("query   7", ["a"])]   # the same queries, other spelling
    train, heldout = split_by_query(sessions, seed=13, fraction=0.2)
    norm = lambda s: " ".join(s.query.lower().split())  # noqa: E731
    assert {norm(s) for s in train}.isdisjoint({norm(s) for s in heldout})
    assert 0.12 < len({norm(s) for s in heldout}) / 300 < 0.28
    assert split_by_query(sessions, 13, 0.2)[1] == heldout            # same seed, same split
    assert {norm(s) for s in split_by_query(sessions, 14, 0.2)[1]} != {norm(s) for s in heldout}
    assert is_heldout("Query 5", 13, 0.2) == is_heldout("  QUERY 5 ", 13, 0.2)


def test_propensity_falls_back_to_the_prior_without_rank_variation():
    fixed, _ = simulate(random.Random(2), shuffle=False)
    prior = list(THETA)
    chosen = propensities(fixed, prior, "estimate", min_rank_variation=50)
    assert chosen.source == "config" and "more than one rank" in chosen.details["reason"]
    varied, _ = simulate(random.Random(2), shuffle=True)
    assert propensities(varied, prior, "estimate", min_rank_variation=50).source == "estimate"
    assert propensities(varied, prior, "config", 50).source == "config"


def test_posterior_separates_relevant_from_noise_clicks_better_than_raw_clicks():
    log, relevant = simulate(random.Random(3), queries=200, sessions=5, shuffle=False)
    props = Propensities(THETA, "config")
    impressions = Impressions.from_sessions(log, 10)
    posterior, fitted = relevance_posterior(impressions, props)
    truth = np.array([item in relevant[int(q.split()[1])] for q, item in impressions.pairs])
    clicked = np.bincount(impressions.pair, impressions.click, len(impressions.pairs)) > 0
    chosen = posterior >= 0.5
    precision = lambda sel: truth[sel].mean()  # noqa: E731
    assert fitted["gamma_relevant"] > 0.6 and fitted["gamma_noise"] < 0.2
    assert precision(chosen) > precision(clicked) + 0.1        # noise clicks are filtered ...
    assert truth[chosen].sum() >= 0.7 * truth[clicked].sum()   # ... most relevant clicked pairs are kept


def test_examples_naive_ips_and_posterior():
    log = [session("q one", ["a", "b", "c"], clicked=["c"]), session("q one", ["a", "b", "c"], clicked=["c"]),
           session("q one", ["a", "b", "c"], clicked=["a"]),
           session("q two", ["d", "e"], clicked=["d"]), session("q two", ["d", "e"], irrelevant=True)]
    props = Propensities(THETA, "config")
    naive = build_examples(log, props, DebiasConfig(enabled=False))
    assert naive.positives == ["c", "c", "a", "d"] and np.allclose(naive.weights, 1)
    # a query's clicked items are never negatives of each other; nothing else is left out
    assert naive.excluded == {"q one": {"a", "c"}, "q two": {"d"}}
    ips = build_examples(log, props, DebiasConfig(method="ips"))
    assert ips.weights[0] > ips.weights[2]            # rank 3 is examined less than rank 1: weighs more
    assert ips.weights.mean() == pytest.approx(1.0)
    posterior = build_examples(log, props, DebiasConfig(method="posterior", min_posterior=0.0,
                                                        uncertain_posterior=1.0))
    # one example per clicked (query, item) pair, weighted by P(relevant): c (clicked twice at rank 3)
    # outweighs a (clicked once at rank 1, where it was examined every time)
    pairs = dict(zip(zip(posterior.queries, posterior.positives), posterior.weights))
    assert set(pairs) == {("q one", "c"), ("q one", "a"), ("q two", "d")}
    assert pairs[("q one", "c")] > pairs[("q one", "a")]
    strict = build_examples(log, props, DebiasConfig(method="posterior", min_posterior=0.99, uncertain_posterior=1.0))
    assert len(strict) < len(posterior) and strict.excluded["q one"] >= {"a", "c"}  # dropped, but no negative
    # a shown, never-clicked item whose relevance stays uncertain leaves the denominator too
    loose = build_examples(log, props, DebiasConfig(method="posterior", uncertain_posterior=0.001))
    assert "b" in loose.excluded["q one"] and "b" not in posterior.excluded["q one"]


def test_heldout_labels_grade_clicks_by_the_click_models_evidence():
    props = Propensities(THETA, "config")
    repeated = [session(f"q{n}", ["x", "y", "w", "v"], ["w"]) for n in range(30) for _ in range(4)]
    # an isolated click at rank 1 among five impressions (examined ~90% of the time): weak evidence
    noise = [session("q noise", ["n", "m", "o", "p"], ["n"] if k == 0 else []) for k in range(5)]
    heldout = heldout_labels(repeated + noise + [session("q none", ["z"])], props)
    assert "q none" not in heldout.queries                       # a query without clicks is not evaluated
    assert heldout.shown["q0"] == {"x", "y", "w", "v"}
    assert heldout.qrels["q0"] == {"w": 10}                      # clicked in 4 of 4 sessions at rank 3
    assert "q noise" not in heldout.qrels                        # grade 0: ignored, not a top grade
    binary = heldout_labels(repeated + noise, props, binary_at=DebiasConfig().heldout_relevant_at)
    assert binary.qrels["q0"] == {"w": 1} and "q noise" not in binary.qrels   # the fine-tune's default: binary
    naive = heldout_labels(repeated + noise, props, click_model=False)
    assert naive.qrels["q noise"] == {"n": 1} and naive.qrels["q0"] == {"w": 1}   # debiasing off: a click is a label


def test_item_vectors_rank_by_best_chunk():
    e = np.eye(3, dtype=np.float32)
    items = ItemVectors.from_chunks({"b": [(1, e[1]), (2, e[2])], "a": [(1, e[0])]})
    assert items.ids == ["a", "b"]
    run = items.rank(np.stack([e[2], e[0]]), ["q1", "q2"], k=2)
    assert max(run["q1"], key=run["q1"].get) == "b" and max(run["q2"], key=run["q2"].get) == "a"
    assert np.allclose(items.best_chunks(np.stack([e[2]]), ["b"]), e[2])


def test_gate_refuses_a_worse_or_equal_model_and_records_both_scores():
    config = GateConfig(metric="ndcg@10", margin=0.01)
    worse = decide({"ndcg@10": 0.60}, {"ndcg@10": 0.65}, config)
    assert not worse.candidate and worse.new == 0.60 and worse.blue == 0.65 and "does not beat" in worse.reason
    assert not decide({"ndcg@10": 0.655}, {"ndcg@10": 0.65}, config).candidate   # inside the margin
    assert decide({"ndcg@10": 0.70}, {"ndcg@10": 0.65}, config).candidate


def test_finetune_config_overrides_are_validated():
    config = load_finetune_config(overrides={"tune": {"num_samples": 2}, "space": {"epochs": {"choice": [1]}}})
    assert config.tune.num_samples == 2 and config.space["epochs"] == {"choice": [1]}
    assert config.space["learning_rate"]["loguniform"][0] > 0   # the rest of the file stays
    with pytest.raises(ValidationError, match="num_sample"):
        load_finetune_config(overrides={"tune": {"num_sample": 2}})
    with pytest.raises(ValidationError, match="low < high"):
        load_finetune_config(overrides={"space": {"learning_rate": {"loguniform": [1e-3, 1e-5]}}})


def test_naive_examples_of_one_query_spelt_two_ways_share_their_exclusions():
    log = [session("Q  One", ["a", "b", "c"], ["a"]), session("q one", ["a", "b", "c"], ["b"])]
    examples = build_examples(log, Propensities(THETA, "config"), DebiasConfig(enabled=False))
    assert len(set(examples.queries)) == 1                          # one query text for both spellings
    assert examples.excluded[examples.queries[0]] == {"a", "b"}     # neither click is the other's negative
