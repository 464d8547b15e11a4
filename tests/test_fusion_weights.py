"""The click-learned fusion (es_ray/train/fusion_weights.py) on synthetic hybrid click logs: no stack."""

from __future__ import annotations

import datetime
import random

from es_ray.store.clickstream import LoggedSession
from es_ray.store.fusion import Fusion, fuse, grid
from es_ray.train.clicklog import split_by_query
from es_ray.train.config import FinetuneConfig
from es_ray.train.fusion_weights import LoggedLists, learn, replayed_run

START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
EXAMINATION = [0.81, 0.56, 0.46, 0.39, 0.29, 0.26, 0.24, 0.20, 0.20, 0.19]
CURRENT = Fusion("rrf", 60.0, 1.0, 0.5)
GRID = grid([0.25, 0.5, 1.0, 2.0], [20.0, 60.0])


def lists_for(rng: random.Random, relevant_in: str, items: int = 30) -> tuple[list[str], list[str], set[str]]:
    """A query's dense and lexical lists (ids best first); two relevant items high in `relevant_in`'s list
    and deep (ranks 9 and 14) in the other."""
    ids = [f"d{n}" for n in range(items)]
    relevant = set(ids[:2])
    others = ids[2:]
    good = ids[:2] + rng.sample(others, len(others))
    poor = rng.sample(others, len(others))
    poor.insert(8, ids[0])
    poor.insert(13, ids[1])
    dense, lexical = (poor, good) if relevant_in == "lexical" else (good, poor)
    return dense, lexical, relevant


def click_log(relevant_in: str, queries: int = 80, per_query: int = 5, seed: int = 3) -> list[LoggedSession]:
    """Hybrid sessions shown by CURRENT (top 10), clicked by a position-based click model: an examined
    result is clicked with probability 0.9 if relevant, 0.03 if not."""
    rng, log = random.Random(seed), []
    for q in range(queries):
        dense, lexical, relevant = lists_for(rng, relevant_in)
        shown = fuse([(i, 0.0) for i in dense], [(i, 0.0) for i in lexical], CURRENT)[:10]
        for n in range(per_query):
            clicked = {f.id for rank, f in enumerate(shown, start=1)
                       if rng.random() < EXAMINATION[rank - 1] * (0.9 if f.id in relevant else 0.03)}
            log.append(LoggedSession(f"q{q}-s{n}", f"query {q}", False, START + datetime.timedelta(seconds=len(log)),
                                     [(rank, f.id) for rank, f in enumerate(shown, start=1)], clicked,
                                     client=f"c{q}-{n}", mode="hybrid",
                                     list_ranks={f.id: (f.dense_rank, f.lexical_rank) for f in shown}))
    return log


def test_a_click_log_where_the_lexical_list_is_better_teaches_a_larger_lexical_weight():
    learned = learn(click_log("lexical"), CURRENT, GRID, FinetuneConfig())
    assert learned.chosen.lexical_weight > CURRENT.lexical_weight
    assert learned.heldout["chosen"]["ndcg@10"] > learned.heldout["current"]["ndcg@10"]
    assert learned.decision.candidate, learned.decision.reason


def test_the_gate_refuses_weights_that_are_not_better_on_held_out_queries():
    # The dense list is the better one: a smaller lexical weight wins, and no larger one is taken.
    learned = learn(click_log("dense"), CURRENT, GRID, FinetuneConfig())
    assert learned.chosen.lexical_weight < CURRENT.lexical_weight
    learned = learn(click_log("dense"), CURRENT, grid([1.0, 2.0], [60.0]), FinetuneConfig())
    assert learned.chosen == CURRENT and not learned.decision.candidate
    assert learned.train_scores["k=60,dense=1,lexical=2"] < learned.train_scores["k=60,dense=1,lexical=0.5"]
    # Better, but not by the gate's margin: refused, with both scores recorded.
    strict = FinetuneConfig.model_validate({"gate": {"margin": 0.5}})
    learned = learn(click_log("lexical"), CURRENT, GRID, strict)
    assert learned.chosen != CURRENT and not learned.decision.candidate
    assert learned.decision.new > learned.decision.blue


def test_sessions_of_other_modes_do_not_teach_the_fusion():
    log = click_log("lexical")
    for s in log:
        s.mode = "dense"
    try:
        learn(log, CURRENT, GRID, FinetuneConfig())
    except ValueError as err:
        assert "hybrid clicks" in str(err)
    else:
        raise AssertionError("dense sessions taught the fusion")


def test_unshown_items_that_surely_rank_higher_push_shown_ones_down():
    # Shown: a at (dense 50, lexical 1), b at (dense 2, no lexical rank), c at (dense 1, lexical 3).
    # Lexical rank 2 was not shown: with weight 4 its holder scores at least 4/62 = 0.0645, more than
    # b's 1/62, less than a's 1/110 + 4/61 and c's 1/61 + 4/63: it sits between a and b.
    lists = LoggedLists({"a": (50, 1), "b": (2, None), "c": (1, 3)})
    run = replayed_run(lists, Fusion("rrf", 60.0, 1.0, 4.0))
    assert sorted(run, key=lambda i: -run[i]) == ["c", "a", "~intruder-2", "b"]
    # With the current weights no unshown rank surely beats a shown item: the logged order alone.
    run = replayed_run(lists, CURRENT)
    assert sorted(run, key=lambda i: -run[i]) == ["c", "a", "b"]


def test_held_out_clicks_never_reach_the_choice_made_on_train_queries():
    # With the examination model from the config (not estimated from every session), the held-out
    # sessions' clicks can change only the held-out scores and the gate, never the train scores or the choice.
    config = FinetuneConfig.model_validate({"debias": {"propensity": "config"}})
    log = click_log("lexical")
    heldout = {s.session_id for s in split_by_query(log, config.data.split_seed, config.data.heldout_fraction)[1]}
    assert heldout and len(heldout) < len(log)
    before = learn(log, CURRENT, GRID, config)
    for s in log:
        if s.session_id in heldout:   # the held-out users now click the opposite way
            s.clicked = {item for _, item in s.shown[5:8]}
    after = learn(log, CURRENT, GRID, config)
    assert after.train_scores == before.train_scores and after.chosen == before.chosen
    assert after.heldout != before.heldout


def test_a_change_the_train_queries_prefer_is_refused_when_held_out_queries_do_not():
    # Train queries' users find relevant results in the lexical list, held-out queries' users in the
    # dense one: train picks a larger lexical weight, the gate (margin 0) refuses it on held-out.
    config = FinetuneConfig.model_validate({"gate": {"margin": 0.0}})
    lexical, dense = click_log("lexical"), click_log("dense", seed=4)
    split = lambda log: split_by_query(log, config.data.split_seed, config.data.heldout_fraction)  # noqa: E731
    log = split(lexical)[0] + split(dense)[1]
    learned = learn(log, CURRENT, GRID, config)
    assert learned.chosen.lexical_weight > CURRENT.lexical_weight
    assert learned.decision.new <= learned.decision.blue and not learned.decision.candidate, learned.decision
