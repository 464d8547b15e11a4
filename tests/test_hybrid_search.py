"""Search modes end to end on the real stack: dense, lexical (Postgres full-text search) and hybrid (both
fused), over HTTP. The lexical index through a reindex + switch is checked in test_lifecycle_e2e.py."""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import numpy as np
import pytest

from es_ray.inference.triton_client import TritonEncoder
from es_ray.serve.fusion_exploration import alternatives
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.store import blue_green, clickstream, db, fusion_weights
from es_ray.store.fusion import Fusion
from es_ray.store.collections import Collection
from tests.helpers import ids, person, search

MODES = ("dense", "lexical", "hybrid")
INJECTION = "Robert'); DROP TABLE items_v1; SELECT pg_sleep(10);-- & !cat | dog:* <-> \"quoted\""
SHELF_ITEMS = [{"id": f"hy-{n:02d}", "text": f"Zorblax gadget manual, chapter {n}: assembling the gadget's frame "
                f"and {'winding the spring' if n % 2 else 'oiling the hinge'}.", "payload": {"shelf": n % 2}}
               for n in range(12)]
ODD_ITEM = {"id": "hy-injection", "text": f"A note that quotes {INJECTION} verbatim, a classic school prank."}


@pytest.fixture(scope="module")
def hybrid_items(api, loaded_collection):
    """The loaded collection plus a dozen items of our own (filters) and one holding an injection string."""
    response = api.put("/v1/items", json={"items": SHELF_ITEMS + [ODD_ITEM]})
    assert response.status_code == 200 and not response.json()["failed"], response.text
    yield loaded_collection
    api.request("DELETE", "/v1/items", json={"ids": [i["id"] for i in SHELF_ITEMS + [ODD_ITEM]]}).raise_for_status()


def blue(stack) -> blue_green.Target:
    with db.connect(stack.postgres_dsn) as conn:
        return blue_green.get_blue(conn)


def rrf(dense: list[str], lexical: list[str], k: float, dense_weight: float, lexical_weight: float) -> list[str]:
    """Reciprocal rank fusion of two id lists, written out here independently of store/fusion.py."""
    return sorted(set(dense) | set(lexical), key=lambda i: (
        -sum(weight / (k + ranks.index(i) + 1) for ranks, weight in ((dense, dense_weight), (lexical, lexical_weight))
             if i in ranks), i))


def test_each_mode_answers_and_its_session_records_the_lists_ranks(api, settings, hybrid_items):
    _, queries, _ = hybrid_items
    query = next(iter(queries.values()))
    # Each list on its own (no session: no exploration swap), as deep as hybrid fuses them.
    dense = ids(search(api, query, mode="dense", limit=100, session=False))
    lexical = ids(search(api, query, mode="lexical", limit=100, session=False))
    assert len(dense) == 100 and lexical, (len(dense), len(lexical))
    assert dense != lexical
    for mode in MODES:
        body = search(api, query, mode=mode, limit=20)
        # The lexical list holds only the items with one of the query's rarer terms (store/lexical.py).
        assert body["model"] == "v1" and body["session_id"], body
        assert len(body["results"]) == (min(20, len(lexical)) if mode == "lexical" else 20), (mode, body)
        session = api.get(f"/v1/sessions/{body['session_id']}").json()
        assert session["mode"] == mode
        shown = session["results"]
        assert [r["id"] for r in shown] == ids(body)
        for r in shown:   # each result's rank in each list, or null where that list does not hold it
            expect_dense = dense.index(r["id"]) + 1 if mode != "lexical" and r["id"] in dense else None
            expect_lexical = lexical.index(r["id"]) + 1 if mode != "dense" and r["id"] in lexical else None
            assert (r["dense_rank"], r["lexical_rank"]) == (expect_dense, expect_lexical), (mode, r)
    hybrid = search(api, query, mode="hybrid", limit=20, session=False)
    # Reciprocal rank fusion of those two lists (search.* as configured).
    s = settings.search
    assert s.fusion == "rrf"
    assert ids(hybrid) == rrf(dense, lexical, s.rrf_k, s.dense_weight, s.lexical_weight)[:20]
    scores = [r["score"] for r in hybrid["results"]]
    assert scores == sorted(scores, reverse=True)


def test_the_default_mode_is_the_configured_one(api, settings, hybrid_items):
    _, queries, _ = hybrid_items
    query = next(iter(queries.values()))
    default = search(api, query, limit=10)
    assert api.get(f"/v1/sessions/{default['session_id']}").json()["mode"] == settings.search.default_mode
    named = search(api, query, mode=settings.search.default_mode, limit=10, session=False)
    assert set(ids(default)) == set(ids(named))  # the same list (the session's may have one exploration swap)


def test_a_lexical_query_counts_its_first_terms_only(api, settings, hybrid_items):
    """search.max_query_terms bounds what one query costs: the terms after it (in lexeme order) are left out."""
    assert ids(search(api, "zorblax", mode="lexical", limit=3, session=False))
    filler = " ".join(f"aa{n:03d}x" for n in range(settings.search.max_query_terms))  # lexemes before "zorblax"
    assert search(api, f"{filler} zorblax", mode="lexical", session=False)["results"] == []


def test_an_exact_term_dense_search_misses_is_found_by_lexical_search(api, stack, settings, hybrid_items):
    """Rare words, each in exactly one document of the collection (Postgres says so): lexical search ranks
    that document first for every one of them; dense search misses some of them in its top 10."""
    items, _, _ = hybrid_items
    target = blue(stack)
    words: dict[str, Counter] = {}
    for item in items:
        for word in set(re.findall(r"\b[a-z]{9,}\b", item["text"].lower())):
            words.setdefault(word, Counter())[item["id"]] += 1
    candidates = sorted(w for w, docs in words.items() if len(docs) == 1)
    unique = []
    with db.connect(stack.postgres_dsn) as conn:
        for word in candidates:
            matching = conn.execute(f"SELECT count(*) FROM items_{target.collection} WHERE NOT deleted "
                                    "AND lexical @@ plainto_tsquery(%s::regconfig, %s)",
                                    (settings.search.text_search_config, word)).fetchone()[0]
            if matching == 1:
                unique.append(word)
            if len(unique) == 15:
                break
    assert len(unique) == 15, unique
    missed = []
    for word in unique:
        [holder] = words[word]
        assert ids(search(api, word, mode="lexical", limit=10, session=False))[:1] == [holder], word
        if holder not in ids(search(api, word, mode="dense", limit=10, session=False)):
            missed.append(word)
        assert holder in ids(search(api, word, mode="hybrid", limit=10, session=False)), word
    assert missed, "dense search found every rare word's document in its top 10"


def test_lexical_scores_are_idf_times_cover_density_with_common_words_read_from_postgres_statistics(
        api, stack, settings, hybrid_items):
    """The lexical ranking recomputed here term by term, every df counted: the served SQL reads the common
    words' df from pg_stats instead (ANALYZE samples every row of a table this small, so its shares are
    exact) and must rank and score alike."""
    s = settings.search
    table = f"items_{blue(stack).collection}"
    _, queries, _ = hybrid_items
    with db.connect(stack.postgres_dsn) as conn:
        conn.execute(f"ANALYZE {table}")
        n = conn.execute("SELECT reltuples FROM pg_class WHERE relname = %s", (table,)).fetchone()[0]
        common = set(conn.execute("SELECT most_common_elems::text::text[] FROM pg_stats WHERE tablename = %s "
                                  "AND attname = 'lexical'", (table,)).fetchone()[0])

        def df(term: str) -> int:
            return conn.execute(f"SELECT count(*) FROM {table} WHERE lexical @@ plainto_tsquery('simple', %s)",
                                (term,)).fetchone()[0]

        def terms(query: str) -> list[str]:
            return conn.execute("SELECT tsvector_to_array(to_tsvector(%s::regconfig, %s))",
                                (s.text_search_config, query)).fetchone()[0]

        # A query with a word pg_stats lists (df read there) and a rare one (counted, and a candidate source).
        query = next(q for q in queries.values() if set(terms(q)) & common
                     and any(0 < df(t) <= n * s.lexical_common_share for t in terms(q)))
        counts = {t: df(t) for t in terms(query) if df(t) > 0}
        idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in counts.items()}
        rare = [t for t, d in counts.items() if d <= n * s.lexical_common_share] or list(counts)
        scores: dict[str, float] = {}
        holders: set[str] = set()
        for term in counts:
            for object_id, rank in conn.execute(
                    f"SELECT object_id, ts_rank_cd(lexical, plainto_tsquery('simple', %s), 1) FROM {table} "
                    "WHERE lexical @@ plainto_tsquery('simple', %s) AND NOT deleted", (term, term)).fetchall():
                scores[object_id] = scores.get(object_id, 0.0) + idf[term] * rank
                if term in rare:
                    holders.add(object_id)
    expected = sorted(holders, key=lambda i: (-scores[i], i))[:50]
    served = search(api, query, mode="lexical", limit=50, session=False)["results"]
    assert [r["id"] for r in served] == expected
    # pg_stats keeps shares as float4: a df read there may differ from the count in its 7th digit.
    assert [r["score"] for r in served] == pytest.approx([scores[i] for i in expected], rel=1e-5)


def test_hybrid_filters_and_pages(api, hybrid_items):
    body = search(api, "zorblax gadget spring", mode="hybrid", limit=100, filter={"shelf": 1}, session=False)
    shown = ids(body)
    assert {i for i in shown if i.startswith("hy-")} == {i["id"] for i in SHELF_ITEMS if i["payload"]["shelf"] == 1}
    assert all(r["payload"].get("shelf") == 1 for r in body["results"]), body["results"]
    _, queries, _ = hybrid_items
    for query in list(queries.values())[:2]:
        whole = ids(search(api, query, mode="hybrid", limit=100, session=False))
        paged = []
        for offset in range(0, 100, 7):
            paged += ids(search(api, query, mode="hybrid", limit=min(7, 100 - offset), offset=offset, session=False))
        assert paged == whole and len(set(paged)) == len(paged) == 100
        assert search(api, query, mode="hybrid", limit=10, offset=1000, session=False)["results"] == []


def test_the_lexical_index_follows_upserts_and_deletes(api, hybrid_items):
    # Made-up words: no other item holds them.
    item = {"id": "hy-follow", "text": "A field guide to zyqloxite crystals of mountain lakes."}
    assert api.put("/v1/items", json={"items": [item]}).status_code == 200
    try:
        assert ids(search(api, "zyqloxite", mode="lexical", session=False)) == ["hy-follow"]
        assert api.put("/v1/items", json={"items": [{**item, "text": "A field guide to vorpaline mosses."}]}
                       ).status_code == 200
        assert ids(search(api, "zyqloxite", mode="lexical", session=False)) == []
        assert ids(search(api, "vorpaline", mode="lexical", session=False)) == ["hy-follow"]
    finally:
        assert api.request("DELETE", "/v1/items", json={"ids": ["hy-follow"]}).status_code == 200
    assert ids(search(api, "vorpaline", mode="lexical", session=False)) == []


def test_an_injection_string_is_matched_literally(api, hybrid_items):
    # Its words, matched as words: the item holding all of them first (no session: no exploration swap).
    assert ids(search(api, INJECTION, mode="lexical", limit=5, session=False))[:1] == ["hy-injection"]
    assert "hy-injection" in ids(search(api, INJECTION, mode="hybrid", limit=3, session=False))
    assert ids(search(api, "school prank", mode="lexical", session=False))[:1] == ["hy-injection"]  # table still there


def test_a_query_of_stop_words_answers_an_empty_list(api, hybrid_items):
    assert search(api, "the of and to", mode="lexical")["results"] == []
    hybrid = ids(search(api, "the of and to", mode="hybrid", limit=10, session=False))  # the dense list alone
    assert len(hybrid) == 10 and hybrid == ids(search(api, "the of and to", mode="dense", limit=10, session=False))


def test_hybrid_search_is_personalised(api, stack, settings, hybrid_items):
    """A user whose clicks moved an item to their query (here: written as that user's vectors) sees it
    first in their dense list, so higher in their hybrid list than everybody else does."""
    _, queries, _ = hybrid_items
    query = list(queries.values())[1]
    anonymous = ids(search(api, query, mode="hybrid", limit=100, session=False))
    item = anonymous[30]
    target = blue(stack)
    vector = TritonEncoder.of(stack.triton_grpc_url, QUERY_ENCODER, target, settings).embed_queries([query])[0]
    collection = Collection(target.collection, target.dim)
    with db.connect(stack.postgres_dsn) as conn:
        parts = collection.chunk_vectors(conn, [item])[item]
        collection.save_user(conn, "hy-user", [(item, part_no, np.asarray(vector)) for part_no, _ in parts])
    try:
        body = search(api, query, mode="hybrid", limit=100, user_id="hy-user")
        assert ids(body).index(item) < 30, ids(body).index(item)
        session = api.get(f"/v1/sessions/{body['session_id']}").json()
        assert session["user_id"] == "hy-user"
        assert [r["dense_rank"] for r in session["results"] if r["id"] == item] == [1]
    finally:
        with db.connect(stack.postgres_dsn) as conn:
            collection.forget_user(conn, "hy-user")


def test_hybrid_search_serves_the_collections_promoted_fusion(api, stack, settings, hybrid_items):
    """A fusion promoted for the blue collection (what `es-ray learn-fusion` writes when the gate passes
    it) ranks hybrid searches as soon as the replicas are notified; forgotten, the configured one again."""
    _, queries, _ = hybrid_items
    s = settings.search
    promoted = Fusion("rrf", 5.0, 1.0, 4.0)   # far from the configured one
    for query in list(queries.values())[:20]:   # a query whose two lists disagree enough to change its order
        dense = ids(search(api, query, mode="dense", limit=100, session=False))
        lexical = ids(search(api, query, mode="lexical", limit=100, session=False))
        configured = rrf(dense, lexical, s.rrf_k, s.dense_weight, s.lexical_weight)[:20]
        expected = rrf(dense, lexical, promoted.k, promoted.dense_weight, promoted.lexical_weight)[:20]
        if expected != configured:
            break
    assert expected != configured, "no query of the first 20 ranks differently under the two fusions"
    assert ids(search(api, query, mode="hybrid", limit=20, session=False)) == configured

    def hybrid_until(wanted: list[str]) -> list[str]:
        deadline = time.monotonic() + 15   # a notification reaches the replicas at commit; 15 s is generous
        while True:
            found = ids(search(api, query, mode="hybrid", limit=20, session=False))
            if found == wanted or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    target = blue(stack)
    gate = {"candidate": True, "reason": "test"}
    with db.connect(stack.postgres_dsn) as conn:
        assert fusion_weights.promote(conn, target.collection, promoted, None, "run", 1, gate)
    try:
        # A second learner gated against the configured fusion, or against another promoted one, promotes
        # nothing: it was never compared with the fusion that serves now.
        with db.connect(stack.postgres_dsn) as conn:
            assert not fusion_weights.promote(conn, target.collection, Fusion("rrf", 60.0, 1.0, 1.0), None, "r2", 2, gate)
            assert not fusion_weights.promote(conn, target.collection, Fusion("rrf", 60.0, 1.0, 1.0),
                                              Fusion("rrf", 20.0, 1.0, 0.5), "r2", 2, gate)
            assert fusion_weights.record(conn, target.collection)["mlflow_version"] == 1
        assert hybrid_until(expected) == expected
        pages = search(api, query, mode="hybrid", limit=5, session=False)   # never explored
        assert pages["fusion"] == promoted.label() == "rrf k=5 dense=1 lexical=4"   # pages say which ranking
        # The session of a hybrid search records the ranks it was fused from, as with the configured fusion
        # (whichever fusion ranked it: a recorded search may be explored, serve/fusion_exploration.py).
        body = search(api, query, mode="hybrid", limit=5)
        shown = api.get(f"/v1/sessions/{body['session_id']}").json()["results"]
        assert all(r["dense_rank"] or r["lexical_rank"] for r in shown)
        # ... and the learners read them back with the mode (what train/fusion_weights.py re-fuses).
        with db.connect(stack.postgres_dsn) as conn:
            logged = next(x for x in clickstream.recent_sessions(conn, 50) if x.session_id == body["session_id"])
        assert (logged.mode, logged.model_version) == ("hybrid", target.model_version)
        assert logged.list_ranks == {r["id"]: (r["dense_rank"], r["lexical_rank"]) for r in shown}
    finally:
        with db.connect(stack.postgres_dsn) as conn:
            fusion_weights.forget(conn, target.collection)
    assert hybrid_until(configured) == configured
    assert search(api, query, mode="hybrid", limit=5, session=False)["fusion"] == \
        f"rrf k={s.rrf_k:g} dense={s.dense_weight:g} lexical={s.lexical_weight:g}"
    assert search(api, query, mode="dense", limit=5, session=False)["fusion"] is None


def test_a_share_of_recorded_hybrid_searches_is_ranked_by_a_neighbouring_fusion_on_every_page(stack, api, settings,
                                                                                             hybrid_items):
    """Exploration (serve/fusion_exploration.py): some (query, client) pairs of recorded anonymous searches
    are ranked by one of the configured fusion's grid neighbours, named in `fusion`; every page of that
    query from that client follows it (no duplicates, no gaps), its session records the lists' ranks, and
    the same search without a session is ranked by the configured fusion."""
    s = settings.search
    assert s.fusion_explore_share > 0
    configured = Fusion.configured(s)
    neighbours = {f.label(): f for f in alternatives(configured, s.learned_lexical_weights, s.learned_rrf_ks,
                                                      s.fusion_explore_over)}
    _, queries, _ = hybrid_items
    lists = {}

    def explored_pair():
        # 5 people x 20 queries: at share 0.2, no pair explored (and ranked apart) has p < 1e-7.
        for n in range(200, 205):
            client = person(stack.serve_url, n)
            for query in queries.values():
                label = search(client, query, mode="hybrid", limit=7, offset=10)["fusion"]
                assert label == configured.label() or label in neighbours, label
                if label == configured.label():
                    continue
                if query not in lists:
                    lists[query] = (ids(search(api, query, mode="dense", limit=100, session=False)),
                                    ids(search(api, query, mode="lexical", limit=100, session=False)))
                fusion = neighbours[label]
                expected = rrf(*lists[query], fusion.k, fusion.dense_weight, fusion.lexical_weight)
                if expected[:30] != rrf(*lists[query], s.rrf_k, s.dense_weight, s.lexical_weight)[:30]:
                    return client, query, fusion, expected
            client.close()
        raise AssertionError("no recorded search of 5 people x 20 queries was explored")

    client, query, explored, expected = explored_pair()
    try:
        first = search(client, query, mode="hybrid", limit=10)
        assert first["fusion"] == explored.label()
        assert set(ids(first)) == set(expected[:10])   # the first page may also have one exploration swap
        for offset in (10, 17):
            page = search(client, query, mode="hybrid", limit=7, offset=offset)
            assert page["fusion"] == explored.label() and ids(page) == expected[offset:offset + 7]
        unrecorded = search(client, query, mode="hybrid", limit=10, offset=10, session=False)
        assert unrecorded["fusion"] == configured.label()
    finally:
        client.close()
    dense, lexical = lists[query]
    shown = api.get(f"/v1/sessions/{first['session_id']}").json()["results"]
    assert [r["id"] for r in shown] == ids(first)
    assert all((r["dense_rank"], r["lexical_rank"]) == (dense.index(r["id"]) + 1 if r["id"] in dense else None,
                                                         lexical.index(r["id"]) + 1 if r["id"] in lexical else None)
               for r in shown)
