"""Nobody steers the global ranking or the fine-tune alone (issue 16): a filtered session teaches only its
user, a (query, item) pair teaches once learning.min_clients distinct clients clicked it, and one client's
votes are capped (es_ray/train/learning_guards.py, store/evidence.py)."""

from __future__ import annotations

import datetime
import hashlib

import httpx
import numpy as np
import psycopg
import pytest
from pydantic import ValidationError

from es_ray.config import LearningSettings, MemorySettings, load_settings
from es_ray.improve.adjuster import VectorAdjuster
from es_ray.improve.loop import Learning, improve_once, learning_from
from es_ray.serve.clients import identify, trusted_networks
from es_ray.store import clickstream, db, evidence
from es_ray.store.clickstream import LoggedSession, Provenance
from es_ray.store.collections import Collection, EmbeddedItem
from es_ray.train.clicklog import read_sessions
from es_ray.train.config import load_finetune_config
from es_ray.train.examples import build_examples
from es_ray.train.learning_guards import evidence_counts, teaching_sessions
from es_ray.train.propensity import Propensities
from tests.helpers import ids, person, search

GUARDS = LearningSettings()                       # the defaults: 3 clients, one vote each per cell
EXAMINATION = load_finetune_config().debias.examination_prior
START = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
SHOWN = [(rank, f"g-{rank - 1}") for rank in range(1, 11)]          # g-9 is ranked 10th


def session(n: int, client: str | None, clicked: set[str], filtered: bool = False, query: str = "tidal power",
            user: str | None = None) -> LoggedSession:
    return LoggedSession(f"s-{client}-{n}", query, False, START + datetime.timedelta(seconds=n), list(SHOWN),
                         set(clicked), user, "served", client, filtered)


def farm(client: str, sessions: int, item: str = "g-9", filtered: bool = False) -> list[LoggedSession]:
    return [session(n, client, {item}, filtered) for n in range(sessions)]


def positives(sessions: list[LoggedSession]) -> set[str]:
    config = load_finetune_config().debias
    return set(build_examples(sessions, Propensities(np.asarray(EXAMINATION), "config"), config).positives)


# --- the rules, on session lists -------------------------------------------------------------------------


def test_the_guards_are_checked_settings_with_safe_defaults():
    assert (GUARDS.min_clients, GUARDS.max_votes_per_client) == (3, 1)
    assert load_settings().learning == GUARDS                       # configs/stack.yaml says the same
    assert learning_from(load_settings(learning={"min_clients": 5})).guards.min_clients == 5
    for bad in ({"min_clients": 0}, {"max_votes_per_client": 0}, {"max_sessions_per_client": 0}):
        with pytest.raises(ValidationError):
            LearningSettings(**bad)


def test_a_one_client_farm_and_filtered_sessions_give_the_fine_tune_no_example():
    honest = [session(0, f"10.0.0.{n}", {"g-2"}) for n in range(3)]            # three people agree on g-2
    narrow = [session(n, f"8.8.8.{n}", {"g-7"}, filtered=True) for n in range(5)]   # a filter shows g-7
    # What the fine-tune learned before: the farm's item, or what the filtered sessions clicked.
    assert "g-9" in positives(honest + farm("6.6.6.6", 1000)) and "g-7" in positives(honest + narrow)
    steered = farm("6.6.6.6", 1000) + farm("7.7.7.7", 1, "g-8") + narrow
    guarded = teaching_sessions(honest + steered, GUARDS)
    assert positives(guarded.sessions) == {"g-2"}
    # The farm counts once (one session per query and client) and its pair is withheld: not even shown.
    farmed = [s for s in guarded.sessions if s.client in ("6.6.6.6", "7.7.7.7")]
    assert len(farmed) == 2 and all("g-9" not in dict(s.shown).values() and not s.clicked for s in farmed)
    assert guarded.dropped["filtered"] == 5 and guarded.dropped["over_client_caps"] == 999
    assert not any(s.filtered for s in guarded.sessions)


def test_a_pair_teaches_the_fine_tune_once_three_clients_clicked_it():
    for clients, taught in ((1, False), (2, False), (3, True)):
        log = [s for n in range(clients) for s in farm(f"10.1.0.{n}", 50)]
        assert ("g-9" in positives(teaching_sessions(log, GUARDS).sessions)) is taught, clients
    # A session without a recorded client (older than migration 2) is a client of its own.
    legacy = [session(n, None, {"g-9"}) for n in range(3)]
    assert "g-9" in positives(teaching_sessions(legacy, GUARDS).sessions)


def test_three_addresses_of_one_ipv6_host_are_one_client_that_teaches_nothing():
    """An ordinary IPv6 host owns a /64 and can send from any address in it: the client a session records
    (serve/clients.py identify) is the /64, so three of its addresses are one clicker, not min_clients."""
    nobody = trusted_networks(())
    addresses = ("2001:db8:5:6::1", "2001:db8:5:6:aaaa::2", "2001:db8:5:6:ffff:ffff:ffff:fffe")
    log = [s for address in addresses for s in farm(identify(address, None, nobody), 50)]
    assert "g-9" not in positives(teaching_sessions(log, GUARDS).sessions)
    hosts = ("2001:db8:5:6::1", "2001:db8:5:7::1", "2001:db8:5:8::1")     # three networks: three clients
    log = [s for address in hosts for s in farm(identify(address, None, nobody), 50)]
    assert "g-9" in positives(teaching_sessions(log, GUARDS).sessions)


def test_one_client_brings_at_most_its_most_recent_sessions_to_a_training_set():
    busy = [session(n, "10.2.0.1", {"g-1"}, query=f"query {n}") for n in range(10)]
    kept = teaching_sessions(busy, LearningSettings(max_sessions_per_client=4, min_clients=1)).sessions
    assert [s.query for s in kept] == ["query 6", "query 7", "query 8", "query 9"]
    twice = [session(n, "10.2.0.1", {"g-1"}) for n in range(5)]
    kept = teaching_sessions(twice, LearningSettings(max_votes_per_client=2, min_clients=1)).sessions
    assert [s.session_id for s in kept] == ["s-10.2.0.1-3", "s-10.2.0.1-4"]


def test_the_evidence_counts_one_vote_per_client_and_cell_and_withhold_lone_pairs():
    counts = {(item, rank): (n, c) for _, item, rank, n, c in evidence_counts(
        farm("6.6.6.6", 1000) + [session(0, f"10.0.0.{n}", {"g-2"}) for n in range(3)], GUARDS)}
    assert ("g-9", 10) not in counts                               # a lone client's pair: as if never shown
    assert counts[("g-2", 3)] == (4, 3)                            # four clients saw it, three clicked it
    assert counts[("g-0", 1)] == (4, 0)                            # the farm's 1,000 impressions count once


# --- the improvement loop on a database of its own ---------------------------------------------------------

DIM = 8


def unit_vector(text: str) -> np.ndarray:
    v = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).normal(size=DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def embed_queries(texts: list[str]) -> np.ndarray:
    """A fixed vector per query text: the memories' arithmetic needs one, not a model."""
    return np.stack([unit_vector(t) for t in texts])


@pytest.fixture()
def conn(scratch_database):
    dsn = scratch_database("esr_learning_guards")
    db.migrate(dsn)
    with db.connect(dsn) as connection:
        yield connection


@pytest.fixture()
def collection(conn):
    collection = Collection("guards", DIM)
    collection.create(conn)
    collection.upsert(conn, [EmbeddedItem(item, {}, unit_vector(item)[None, :]) for _, item in SHOWN])
    return collection


def record(conn, sessions: list[LoggedSession]) -> None:
    for s in sessions:
        clickstream.record_session(conn, s.session_id, s.user_id, s.query, 1, s.shown,
                                   Provenance("served", None, s.client), filtered=s.filtered)
        if s.clicked:
            clickstream.add_events(conn, s.session_id, [(f"e-{item}", item, "click") for item in s.clicked])
    conn.execute("UPDATE sessions SET created_at = created_at - interval '1 hour'")


def improve(conn, collection) -> int:
    learning = Learning(VectorAdjuster(), MemorySettings(), EXAMINATION, (), GUARDS)
    total = 0
    while (done := improve_once(conn, collection, embed_queries, learning, settle_s=0)["sessions"]) > 0:
        total += done
    return total


def closeness(conn, collection, item: str, query: str = "tidal power") -> float:
    [(_, vector)] = collection.chunk_vectors(conn, [item])[item]
    return float(vector @ unit_vector(query))


def test_one_or_two_clients_move_nothing_in_the_global_vectors_three_do(conn, collection):
    before = closeness(conn, collection, "g-9")
    record(conn, farm("6.6.6.6", 1000))                            # one client clicks g-9 a thousand times
    assert improve(conn, collection) == 1000
    assert not collection.adjusted(conn, ["g-9"]) and closeness(conn, collection, "g-9") == pytest.approx(before)
    record(conn, farm("7.7.7.7", 20))                              # a second client: still not enough
    improve(conn, collection)
    assert not collection.adjusted(conn, [item for _, item in SHOWN])
    # The SQL reading of the evidence and the in-memory one (the quality harness's) agree.
    logged = clickstream.recent_sessions(conn, 10_000)
    assert evidence.counts_for_queries(conn, ["tidal power"], max_votes_per_client=1, min_clients=3) == \
        evidence_counts(logged, GUARDS)
    record(conn, farm("8.8.8.8", 1))                               # a third: the pair teaches
    improve(conn, collection)
    assert collection.adjusted(conn, ["g-9"]) == {"g-9"} and closeness(conn, collection, "g-9") > before + 0.1
    # Once taught, the evidence says three votes, not 1,021 clicks.
    cells = {(item, rank): (n, c) for _, item, rank, n, c in
             evidence.counts_for_queries(conn, ["tidal power"], max_votes_per_client=1, min_clients=3)}
    assert cells[("g-9", 10)] == (3, 3)


def test_filtered_sessions_add_no_evidence_but_still_teach_their_user(conn, collection):
    shown = [session(n, f"10.3.0.{n}", {"g-9"}, filtered=True) for n in range(5)]
    mine = session(9, "10.3.0.9", {"g-9"}, filtered=True, user="ann")
    record(conn, shown + [mine])
    assert improve(conn, collection) == 6
    assert conn.execute("SELECT count(*) FROM click_evidence").fetchone()[0] == 0
    assert not collection.adjusted(conn, ["g-9"])
    ann = collection.chunk_vectors(conn, ["g-9"], "ann")["g-9"][0][1]
    assert float(ann @ unit_vector("tidal power")) > closeness(conn, collection, "g-9")   # her own copy moved
    # Nor does the fine-tune's reader see them.
    assert read_sessions(conn, 100, GUARDS).sessions == []


def test_evidence_counted_before_clients_were_kept_counts_one_client_per_click(conn):
    conn.execute("""INSERT INTO click_evidence (query_key, object_id, rank, client, impressions, clicks)
                    VALUES ('q', 'three', 4, '', 5, 3), ('q', 'two', 5, '', 5, 2), ('q', 'two', 5, '10.4.0.1', 9, 9)""")
    cells = evidence.counts_for_queries(conn, ["q"], max_votes_per_client=1, min_clients=3)
    assert cells == [("q", "three", 4, 5, 3), ("q", "two", 5, 6, 3)]


# --- over HTTP, on the shared stack --------------------------------------------------------------------------

TIDAL = [{"id": f"tidal-{n}", "text": f"Tidal power note {n}: {topic}", "payload": {"kind": "tidal"}}
         for n, topic in enumerate([
             "barrages across estuaries", "turbines in fast currents", "lagoons that hold the tide",
             "the moon and the tides", "costs of marine energy", "fish passing turbines",
             "grid storage for tidal output", "sea bed cables", "corrosion of blades", "predicting tidal range",
             "wave and tide compared", "history of tide mills"])]
QUERY = "tidal power from ocean currents"


@pytest.fixture(scope="module")
def tidal(api):
    assert api.put("/v1/items", json={"items": TIDAL}).json()["upserted"] == len(TIDAL)
    yield
    api.request("DELETE", "/v1/items", json={"ids": [item["id"] for item in TIDAL]})   # their evidence goes too


def top10(client: httpx.Client) -> list[str]:
    return ids(search(client, QUERY, limit=10, session=False))


def click_where_shown(client: httpx.Client, target: str, headers: dict | None = None) -> str | None:
    """One search and a click on `target` if it was shown; the session id (None: not shown, or refused
    by the rate limits: 429)."""
    served = client.post("/v1/search", json={"query": QUERY, "limit": 10}, headers=headers)
    if served.status_code == 429 or target not in ids(served.json()):
        return None
    event = {"events": [{"event_id": "e-1", "item_id": target, "type": "click"}]}
    clicked = client.post(f"/v1/sessions/{served.json()['session_id']}/events", json=event, headers=headers)
    if clicked.status_code == 429:
        return None
    assert clicked.json()["accepted"] == 1
    return served.json()["session_id"]


def test_a_click_farm_from_one_client_moves_nothing_and_several_clients_do(anon, api, stack, tidal):
    api.post("/v1/improvement/run", params={"settle_s": 0})   # what earlier tests left, learned first
    before = top10(anon)
    target = before[9]
    # One client, a hundred searches and clicks on the 10th result within a minute. The rate limits refuse
    # what goes past serve.rate_limits (60 clicks a minute), and what they let through must still move
    # nothing: one client is one vote. The X-Forwarded-For it makes up is not believed (no trusted proxy
    # is configured), so it stays one client.
    with person(stack.serve_url, 20) as farmer:
        farmed = [s for s in (click_where_shown(farmer, target, {"X-Forwarded-For": f"203.0.113.{n}"})
                              for n in range(100)) if s]
    assert len(farmed) >= 40
    assert {api.get(f"/v1/sessions/{s}").json()["client"] for s in farmed[:5]} == {"127.0.0.20"}
    assert api.post("/v1/improvement/run", params={"settle_s": 0}).json()["sessions"] >= len(farmed)
    assert top10(anon) == before
    # The same clicks from three more people, each from an address of its own: the Serve proxy passes the
    # peer address through to the replica, so each is a client of its own.
    for n in (2, 3, 4):
        with person(stack.serve_url, n) as someone:
            mine = [s for s in (click_where_shown(someone, target) for _ in range(3)) if s]
            assert mine and api.get(f"/v1/sessions/{mine[0]}").json()["client"] == f"127.0.0.{n}"
    api.post("/v1/improvement/run", params={"settle_s": 0})
    after = top10(anon)
    assert target in after and after.index(target) < before.index(target), (before, after)


FILTERING_PEOPLE = (55, 56, 57, 58)   # addresses no other test sends from: their evidence is this test's alone


def test_a_filtered_search_is_recorded_as_such_and_teaches_nobody_else(api, stack, tidal):
    api.post("/v1/improvement/run", params={"settle_s": 0})
    before = top10(api)
    target = [item for item in before if item.startswith("tidal-")][-1]   # one the filter lets through
    filtered = []
    for n in FILTERING_PEOPLE:   # four people, each with a narrow filter that lets the chosen item through
        with person(stack.serve_url, n) as someone:
            shown = search(someone, QUERY, limit=10, filter={"kind": "tidal"})
            assert target in ids(shown)
            event = {"events": [{"event_id": "e-1", "item_id": target, "type": "click"}]}
            assert someone.post(f"/v1/sessions/{shown['session_id']}/events", json=event).json()["accepted"] == 1
            filtered.append(shown["session_id"])
    assert api.post("/v1/improvement/run", params={"settle_s": 0}).json()["sessions"] >= 4
    assert top10(api) == before
    plain = search(api, "tide mills and their history", limit=3)["session_id"]
    with psycopg.connect(stack.postgres_dsn) as conn:
        rows = conn.execute("SELECT filtered, improved_at IS NOT NULL FROM sessions WHERE session_id = ANY(%s)",
                            (filtered,)).fetchall()
        assert rows == [(True, True)] * 4                      # consumed, and recorded as filtered
        assert conn.execute("SELECT count(*) FROM click_evidence WHERE client = ANY(%s)",
                            ([f"127.0.0.{n}" for n in FILTERING_PEOPLE],)).fetchone()[0] == 0
        assert conn.execute("SELECT filtered FROM sessions WHERE session_id = %s", (plain,)).fetchone()[0] is False
