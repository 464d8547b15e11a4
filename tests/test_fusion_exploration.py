"""Search's exploration of the hybrid fusion (es_ray/serve/fusion_exploration.py and the route's use of it):
no stack. The end-to-end check over HTTP is in test_hybrid_search.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from es_ray.config import AuthSettings, SearchSettings
from es_ray.serve import auth, schemas
from es_ray.serve.fusion_exploration import alternatives, draw
from es_ray.serve.routes.search import _explored, _ranking
from es_ray.store.fusion import Fusion, grid

WEIGHTS, KS = [0.25, 0.5, 0.75, 1.0, 1.5], [20.0, 60.0]
CURRENT = Fusion("rrf", 60.0, 1.0, 0.5)
KEY = b"k" * 32


def test_the_neighbours_are_one_step_along_one_axis_of_the_grid():
    assert set(alternatives(CURRENT, WEIGHTS, KS, "neighbours")) == {
        Fusion("rrf", 60.0, 1.0, 0.25), Fusion("rrf", 60.0, 1.0, 0.75), Fusion("rrf", 20.0, 1.0, 0.5)}
    # At the grid's corner there are fewer; the grid's order of the lists does not matter.
    assert set(alternatives(Fusion("rrf", 20.0, 1.0, 1.5), WEIGHTS[::-1], KS[::-1], "neighbours")) == {
        Fusion("rrf", 20.0, 1.0, 1.0), Fusion("rrf", 60.0, 1.0, 1.5)}
    # A fusion off the grid (a configured one) explores the grid point nearest it too.
    off = Fusion("rrf", 50.0, 1.0, 0.6)
    assert set(alternatives(off, WEIGHTS, KS, "neighbours")) == {
        CURRENT, Fusion("rrf", 60.0, 1.0, 0.25), Fusion("rrf", 60.0, 1.0, 0.75), Fusion("rrf", 20.0, 1.0, 0.5)}
    everything = alternatives(CURRENT, WEIGHTS, KS, "grid")
    assert len(everything) == len(WEIGHTS) * len(KS) - 1 and CURRENT not in everything
    assert set(everything) == set(grid(WEIGHTS, KS)) - {CURRENT}
    assert alternatives(Fusion("weighted", 60.0, 1.0, 0.5), WEIGHTS, KS, "grid") == []  # only RRF is learned


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5])
def test_the_share_of_explored_query_client_pairs_is_the_configured_one(share):
    choices = alternatives(CURRENT, WEIGHTS, KS, "neighbours")
    n = 20_000
    drawn = [draw(KEY, f"query {q % 400}", f"10.0.{q // 250}.{q % 250}", share, choices) for q in range(n)]
    explored = sum(f is not None for f in drawn)
    # Within 4.5 standard deviations of a binomial: a wrong share fails, chance almost never does.
    assert abs(explored / n - share) < 4.5 * math.sqrt(share * (1 - share) / n), explored / n


def test_one_query_explores_one_fusion_for_everybody_and_queries_spread_uniformly_over_them():
    choices = alternatives(CURRENT, WEIGHTS, KS, "neighbours")
    for q in range(50):   # every explored reader of a query: the same other fusion
        seen = {draw(KEY, f"query {q}", f"10.1.0.{c}", 0.5, choices) for c in range(40)} - {None}
        assert len(seen) == 1, seen
    n = 6_000
    counts = Counter(draw(KEY, f"query {q}", "10.1.0.1", 1.0, choices) for q in range(n))
    assert set(counts) == set(choices)
    expected = n / len(choices)
    for fusion in choices:
        assert abs(counts[fusion] - expected) < 4.5 * math.sqrt(expected), counts


def test_a_query_and_client_draw_alike_every_time_and_only_the_secret_and_they_decide():
    choices = alternatives(CURRENT, WEIGHTS, KS, "neighbours")
    pairs = [(f"query {q}", f"127.1.0.{c}") for q in range(60) for c in range(1, 6)]
    first = [draw(KEY, q, c, 0.3, choices) for q, c in pairs]
    assert first == [draw(KEY, q, c, 0.3, choices) for q, c in pairs]
    assert any(first) and not all(first)
    # The same query however it is spelt (case, spacing), as the click log normalises it.
    assert first == [draw(KEY, f"  {q.upper()} ", c, 0.3, choices) for q, c in pairs]
    # Another secret, another draw; the same person's other query, or another person's same query, too.
    assert first != [draw(b"x" * 32, q, c, 0.3, choices) for q, c in pairs]
    # No secret, no share, nothing to choose: never explored.
    assert not any(draw(b"", q, c, 1.0, choices) for q, c in pairs)
    assert not any(draw(KEY, q, c, 0.0, choices) for q, c in pairs)
    assert not any(draw(KEY, q, c, 1.0, []) for q, c in pairs)


@pytest.fixture
def secret():
    previous = auth._authenticator
    auth.configure(AuthSettings(user_token_secret="test secret"))
    yield
    auth._authenticator = previous


def _request(query: str, **kwargs) -> schemas.SearchRequest:
    return schemas.SearchRequest(query=query, mode="hybrid", **kwargs)


def test_only_recorded_anonymous_unfiltered_hybrid_searches_are_explored_and_all_pages_alike(secret):
    settings = SearchSettings(fusion_explore_share=1.0)   # every eligible search is explored
    ranking = _ranking(settings, "hybrid")
    assert ranking.fusion == CURRENT
    choices = set(alternatives(CURRENT, settings.learned_lexical_weights, settings.learned_rrf_ks, "neighbours"))
    for q in range(20):
        query, client = f"query {q}", f"127.1.0.{q + 1}"
        explored = _explored(settings, _request(query), client, ranking)
        assert explored.fusion in choices
        # Every page of it (offset, limit): the same fusion.
        for offset, limit in ((10, 10), (20, 5), (95, 100)):
            assert _explored(settings, _request(query, offset=offset, limit=limit), client, ranking) == explored
        # Never a user's own ranking, a search that records no session, a filtered one, another mode.
        for request in (_request(query, user_id="u1"), _request(query, session=False),
                        _request(query, filter={"shelf": 1})):
            assert _explored(settings, request, client, ranking) == ranking
        dense = _ranking(settings, "dense")
        assert _explored(settings, _request(query), client, dense) == dense
    # Share 0 (exploration off): nobody.
    off = SearchSettings(fusion_explore_share=0.0)
    assert all(_explored(off, _request(f"query {q}"), "127.1.0.1", ranking) == ranking for q in range(50))


def test_explored_pages_let_the_learner_see_what_the_serving_fusion_never_shows():
    """Why exploration exists: relevant items that only the lexical list holds (rank 1 and 2 there; the two
    lists share no item) never reach the serving fusion's top 10, so its click log cannot teach a larger
    lexical weight; the pages a lexical-heavier neighbour ranks show them, get clicked, and the learner
    (train/fusion_weights.py, with its held-out gate) moves toward it. The grid is this test's own: with
    the configured one (lexical 0.5 -> 0.75) a lexical-only item needs weight 0.87 to pass the dense
    list's 10th, so a neighbour one step away shows it only where the lists overlap."""
    import datetime
    import random

    from es_ray.store.clickstream import LoggedSession
    from es_ray.store.fusion import fuse
    from es_ray.train.config import FinetuneConfig
    from es_ray.train.fusion_weights import learn

    examination = [0.81, 0.56, 0.46, 0.39, 0.29, 0.26, 0.24, 0.20, 0.20, 0.19]
    weights = [0.25, 0.5, 1.0, 2.0]
    choices = alternatives(CURRENT, weights, KS, "neighbours")
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

    def click_log(share: float) -> list[LoggedSession]:
        rng, log = random.Random(5), []
        for q in range(120):
            ids = [f"q{q}-d{n}" for n in range(50)]
            dense, lexical = ids[2:32], ids[:2] + rng.sample(ids[32:], 18)   # the relevant two: lexical only
            for n in range(10):
                client = f"10.0.{q}.{n}"
                fusion = draw(KEY, f"query {q}", client, share, choices) or CURRENT
                shown = fuse([(i, 0.0) for i in dense], [(i, 0.0) for i in lexical], fusion)[:10]
                clicked = {f.id for rank, f in enumerate(shown, start=1)
                           if rng.random() < examination[rank - 1] * (0.9 if f.id in ids[:2] else 0.03)}
                log.append(LoggedSession(f"q{q}-s{n}", f"query {q}", False, start + datetime.timedelta(seconds=len(log)),
                                         [(rank, f.id) for rank, f in enumerate(shown, start=1)], clicked,
                                         client=client, mode="hybrid",
                                         list_ranks={f.id: (f.dense_rank, f.lexical_rank) for f in shown}))
        return log

    unexplored = click_log(0.0)
    assert not any(item.endswith(("-d0", "-d1")) for s in unexplored for _, item in s.shown)   # never shown
    kept = learn(unexplored, CURRENT, grid(weights, KS), FinetuneConfig())
    # Nothing to learn was shown: no fusion passes the gate (stray clicks on shown items are all there is).
    assert not kept.decision.candidate, (kept.chosen, kept.decision.reason)
    explored_log = click_log(0.2)
    assert any(item.endswith(("-d0", "-d1")) for s in explored_log for item in s.clicked)  # shown and clicked
    explored = learn(explored_log, CURRENT, grid(weights, KS), FinetuneConfig())
    assert explored.chosen.lexical_weight > CURRENT.lexical_weight and explored.decision.candidate, \
        (explored.chosen, explored.decision.reason)
