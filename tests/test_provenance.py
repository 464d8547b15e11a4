"""Only sessions es-ray served teach without a key (issue 16): signed session ids, keyed ingestion,
the source and client of every session, readers that leave sources out, event ids per session."""

from __future__ import annotations

import ipaddress
import uuid
import psycopg
import pytest
from pydantic import ValidationError

from es_ray.config import AuthSettings, LearningSettings, load_settings
from es_ray.improve.loop import learning_from
from es_ray.serve import auth
from es_ray.serve.clients import identify, trusted_networks
from es_ray.store import clickstream, db
from es_ray.store.clickstream import Provenance
from es_ray.train.clicklog import read_sessions
from tests.helpers import ids, search

# --- the pieces, without a stack -------------------------------------------------------------------------


def test_served_session_ids_are_signed_and_cannot_be_forged_or_altered():
    signer = auth.Authenticator(AuthSettings(user_token_secret="s" * 40))
    session_id = signer.new_session_id()
    assert signer.served_session(session_id) and session_id != signer.new_session_id()
    body, signature = session_id.rsplit(".", 1)
    altered = body[:-1] + ("0" if body[-1] != "0" else "1") + "." + signature
    assert not signer.served_session(altered)                                  # another nonce, same signature
    assert not signer.served_session(session_id[:-1] + ("A" if session_id[-1] != "A" else "B"))
    assert not signer.served_session(f"s1.{uuid.uuid4().hex}.{signature}")    # a fabricated one
    assert not signer.served_session(uuid.uuid4().hex)                         # what search returned before
    assert not signer.served_session(session_id + "é") and not signer.served_session("s1.é.é")  # no TypeError
    token, _ = signer.issue_token("alice")
    assert not signer.served_session(token)                                    # a user token is not a session id
    assert signer.token_user(session_id) is None                               # nor the reverse
    other = auth.Authenticator(AuthSettings(user_token_secret="t" * 40))
    assert not other.served_session(session_id)                                # the stack's own secret signs
    with pytest.raises(RuntimeError, match="user_token_secret is empty"):
        auth.Authenticator(AuthSettings()).new_session_id()


def test_the_client_is_the_peer_unless_a_trusted_proxy_forwards_it():
    nobody = trusted_networks(())
    assert identify("192.0.2.7", None, nobody) == "192.0.2.7"
    assert identify("192.0.2.7", "198.51.100.1", nobody) == "192.0.2.7"      # anyone can write the header
    proxies = trusted_networks(("10.0.0.0/8", "2001:db8::1"))
    assert identify("10.1.2.3", "203.0.113.9", proxies) == "203.0.113.9"
    # Read from the right past further trusted proxies; what the client itself wrote (left) is ignored.
    assert identify("10.1.2.3", "6.6.6.6, 203.0.113.9, 10.9.9.9", proxies) == "203.0.113.9"
    assert identify("2001:db8::1", "203.0.113.9", proxies) == "203.0.113.9"
    assert identify("192.0.2.7", "203.0.113.9", proxies) == "192.0.2.7"       # this peer is not a proxy
    assert identify("10.1.2.3", "not-an-address", proxies) == "10.1.2.3"
    assert identify("10.1.2.3", "", proxies) == "10.1.2.3"
    assert identify(None, "203.0.113.9", proxies) == "unknown"
    assert isinstance(ipaddress.ip_address(identify("127.0.0.1", None, nobody)), ipaddress.IPv4Address)


def test_an_ipv6_client_is_its_64_network():
    """One host holds a whole /64: counted by address it could pass for as many clients as it likes."""
    nobody = trusted_networks(())
    assert identify("2001:db8:1:2:aaaa::1", None, nobody) == identify("2001:db8:1:2:bbbb::9", None, nobody) \
        == "2001:db8:1:2::/64"
    assert identify("2001:db8:1:3::1", None, nobody) != identify("2001:db8:1:2::1", None, nobody)
    assert identify("::ffff:10.0.0.7", None, nobody) == "10.0.0.7"      # an IPv4 client on a dual-stack socket
    proxies = trusted_networks(("10.0.0.0/8",))
    assert identify("10.1.2.3", "2001:db8:1:2::77", proxies) == "2001:db8:1:2::/64"   # forwarded, too
    assert identify("testclient", None, nobody) == "testclient"       # not an IP peer: its name as given


def test_excluded_sources_and_trusted_proxies_are_checked_settings():
    assert LearningSettings().exclude_sources == ["unverified"]      # recorded when anyone could
    with pytest.raises(ValidationError):
        LearningSettings(exclude_sources=["servd"])
    with pytest.raises(ValidationError):
        load_settings(clients={"trusted_proxies": ["10.0.0.300"]})
    settings = load_settings(learning={"exclude_sources": ["ingested", "unverified"]})
    assert learning_from(settings).exclude_sources == ("ingested", "unverified")


# --- the store, on a database of its own ------------------------------------------------------------------

@pytest.fixture()
def conn(scratch_database):
    dsn = scratch_database("esr_provenance")
    db.migrate(dsn)
    with db.connect(dsn) as connection:
        yield connection


SERVED, INGESTED, UNVERIFIED = Provenance("served", None, "127.0.0.5"), Provenance("ingested", "ops", "10.0.0.1"), \
    Provenance("unverified")


def test_an_event_id_reused_in_another_session_is_another_event(conn):
    for sid in ("mine", "theirs"):
        clickstream.record_session(conn, sid, None, "q", 1, [(1, "a"), (2, "b")], SERVED)
    assert clickstream.add_events(conn, "mine", [("e-1", "a", "click")]) == (1, 0)
    assert clickstream.add_events(conn, "theirs", [("e-1", "b", "click")]) == (1, 0)   # was a 409
    assert clickstream.add_events(conn, "theirs", [("e-1", "b", "click")]) == (0, 1)   # a resend
    with pytest.raises(clickstream.Conflict):
        clickstream.add_events(conn, "theirs", [("e-1", "a", "click")])
    assert [e["item_id"] for e in clickstream.get_session(conn, "mine").events] == ["a"]
    assert [e["item_id"] for e in clickstream.get_session(conn, "theirs").events] == ["b"]


def test_every_session_records_who_recorded_it(conn):
    clickstream.record_session(conn, "srv", None, "q", 1, [(1, "a")], SERVED)
    clickstream.record_session(conn, "ing", None, "q", None, [(1, "a")], INGESTED)
    assert (clickstream.get_session(conn, "srv").source, clickstream.get_session(conn, "srv").client) == \
        ("served", "127.0.0.5")
    ingested = clickstream.get_session(conn, "ing")
    assert (ingested.source, ingested.key_name, ingested.client) == ("ingested", "ops", "10.0.0.1")
    with pytest.raises(psycopg.errors.CheckViolation):
        clickstream.record_session(conn, "odd", None, "q", None, [(1, "a")], Provenance("made-up"))


def test_the_learners_readers_leave_out_excluded_sources(conn):
    for provenance in (SERVED, INGESTED, UNVERIFIED):
        for user in (None, "ann"):
            sid = f"{provenance.source}-{user or 'anon'}"
            clickstream.record_session(conn, sid, user, "q", 1, [(1, "a"), (2, "b")], provenance)
            clickstream.add_events(conn, sid, [("e-1", "b", "click")])   # the same event id in every session
    conn.execute("UPDATE sessions SET created_at = created_at - interval '1 hour'")
    every = {"served-anon", "served-ann", "ingested-anon", "ingested-ann", "unverified-anon", "unverified-ann"}

    def sources(sessions):
        return {s.session_id for s in sessions}

    assert sources(clickstream.recent_sessions(conn, 100)) == every
    recent = clickstream.recent_sessions(conn, 100, ["ingested", "unverified"])
    assert sources(recent) == {"served-anon", "served-ann"}
    assert {(s.source, s.client, frozenset(s.clicked)) for s in recent} == {("served", "127.0.0.5", frozenset("b"))}
    no_guards = LearningSettings(exclude_sources=["unverified"], min_clients=1, max_votes_per_client=10)
    assert sources(read_sessions(conn, 100, no_guards).sessions) == every - {"unverified-anon", "unverified-ann"}

    with conn.transaction():
        claimed = clickstream.claim_unimproved(conn, 100, 0, ["unverified"])
        assert sources(claimed) == every - {"unverified-anon", "unverified-ann"}
        clickstream.mark_improved(conn, [s.session_id for s in claimed])
    with conn.transaction():   # an excluded session is not consumed: it waits, unlearned
        assert sources(clickstream.claim_unimproved(conn, 100, 0, ["unverified"])) == set()
        assert sources(clickstream.claim_unimproved(conn, 100, 0)) == {"unverified-anon", "unverified-ann"}

    replayed, _ = clickstream.improved_user_sessions(conn, None, 100, ["ingested"])
    assert sources(replayed) == {"served-ann"}
    replayed, _ = clickstream.improved_user_sessions(conn, None, 100)
    assert sources(replayed) == {"served-ann", "ingested-ann"}


# --- over HTTP, on the shared stack ----------------------------------------------------------------------

ITEMS = [{"id": f"prov-{n}", "text": f"Provenance note {n} on glacier melt and sea level"} for n in range(12)]


@pytest.fixture(scope="module")
def items(api):
    assert api.put("/v1/items", json={"items": ITEMS}).json()["upserted"] == len(ITEMS)
    yield
    api.request("DELETE", "/v1/items", json={"ids": [item["id"] for item in ITEMS]})


def stored(stack, sql: str, *params) -> int:
    with psycopg.connect(stack.postgres_dsn) as conn:
        return conn.execute(sql, params).fetchone()[0]


def test_fabricated_sessions_are_refused_and_store_nothing(anon, api, stack, items):
    """The attack of issue 16: anonymous sessions, made up with a click on a chosen item, once taught
    every user's ranking. Now they are refused before anything is stored."""
    target = ITEMS[-1]["id"]
    query = f"glacier melt {uuid.uuid4().hex[:6]}"
    fabricated = {"query": query, "results": [{"id": target, "rank": 1}]}
    alice = api.post("/v1/users/alice/token", json={}).json()["token"]
    for n in range(40):
        response = anon.post("/v1/sessions", json={**fabricated, "session_id": f"fab-{n}"})
        assert response.status_code == 401, response.text
        assert "needs an API key" in response.json()["error"] and "POST /v1/search" in response.json()["error"]
        clicked = anon.post(f"/v1/sessions/fab-{n}/events",
                            json={"events": [{"event_id": "e-1", "item_id": target, "type": "click"}]})
        assert clicked.status_code == 403 and "not returned by this es-ray's search" in clicked.json()["error"]
    # A user's token does not record sessions shown elsewhere either, not even the user's own.
    as_alice = anon.post("/v1/sessions", json={**fabricated, "user_id": "alice"}, headers={"X-User-Token": alice})
    assert as_alice.status_code == 401, as_alice.text
    assert stored(stack, "SELECT count(*) FROM sessions WHERE query = %s", query) == 0
    assert stored(stack, "SELECT count(*) FROM sessions WHERE session_id LIKE %s", "fab-%") == 0


def test_clicks_need_an_id_search_signed(anon, api, stack, items):
    served = search(anon, "sea level rise", limit=5)
    sid, shown = served["session_id"], ids(served)
    assert sid.startswith("s1.")
    session = api.get(f"/v1/sessions/{sid}").json()
    assert (session["source"], session["key_name"], session["client"]) == ("served", None, "127.0.0.1")
    click = {"events": [{"event_id": "e-1", "item_id": shown[0], "type": "click"}]}
    assert anon.post(f"/v1/sessions/{sid}/events", json=click).json() == {"accepted": 1, "duplicates": 0}

    body, signature = sid.rsplit(".", 1)
    for forged in (body + "." + signature[:-1] + ("A" if signature[-1] != "A" else "B"),   # altered signature
                   body[:-1] + ("0" if body[-1] != "0" else "1") + "." + signature,      # altered nonce
                   f"s1.{uuid.uuid4().hex}.{signature}", uuid.uuid4().hex):              # made up
        response = anon.post(f"/v1/sessions/{forged}/events", json=click)
        assert response.status_code == 403, (forged, response.text)
        assert anon.post(f"/v1/sessions/{forged}/irrelevant").status_code == 403
        assert api.post(f"/v1/sessions/{forged}/events", json=click).status_code == 404   # a key: simply unknown
        assert stored(stack, "SELECT count(*) FROM sessions WHERE session_id = %s", forged) == 0
    assert [e["event_id"] for e in api.get(f"/v1/sessions/{sid}").json()["events"]] == ["e-1"]


def test_keyed_ingestion_still_works_and_is_recorded_with_its_source(anon, api, stack, items):
    named = f"ext-{uuid.uuid4().hex[:8]}"
    shown = {"query": "shown by the shop", "session_id": named,
             "results": [{"id": "prov-1", "rank": 1}, {"id": "prov-2", "rank": 2}]}
    assert api.post("/v1/sessions", json=shown).json() == {"session_id": named, "created": True}
    session = api.get(f"/v1/sessions/{named}").json()
    assert (session["source"], session["key_name"], session["client"]) == ("ingested", "local-admin", "127.0.0.1")
    assert session["model_version"] is None
    click = {"events": [{"event_id": "e-1", "item_id": "prov-2", "type": "click"}]}
    # Its id was chosen by the other system, so anyone could guess it: clicks on it need the key.
    refused = anon.post(f"/v1/sessions/{named}/events", json=click)
    assert refused.status_code == 403 and "need an API key" in refused.json()["error"], refused.text
    assert anon.post(f"/v1/sessions/{named}/irrelevant").status_code == 403
    assert api.post(f"/v1/sessions/{named}/events", json=click).json() == {"accepted": 1, "duplicates": 0}
    # A user's session shown elsewhere: recorded with the key, clicked with that user's token.
    ann = api.post("/v1/users/prov-ann/token", json={}).json()["token"]
    hers = f"ext-ann-{uuid.uuid4().hex[:8]}"
    assert api.post("/v1/sessions", json={**shown, "session_id": hers, "user_id": "prov-ann"}).status_code == 200
    assert anon.post(f"/v1/sessions/{hers}/events", json=click,
                     headers={"X-User-Token": ann}).json() == {"accepted": 1, "duplicates": 0}
    assert anon.post(f"/v1/sessions/{hers}/events", json=click).status_code == 403
    assert stored(stack, "SELECT count(*) FROM sessions WHERE session_id IN (%s, %s) AND source = 'ingested'",
                  named, hers) == 2


def test_an_event_id_used_in_another_session_is_accepted(anon, items):
    first, second = search(anon, "glacier", limit=3), search(anon, "glacier", limit=3)
    event = [{"event_id": "e-1", "item_id": ids(first)[0], "type": "click"}]
    assert anon.post(f"/v1/sessions/{first['session_id']}/events", json={"events": event}).json()["accepted"] == 1
    event = [{"event_id": "e-1", "item_id": ids(second)[1], "type": "click"}]
    answer = anon.post(f"/v1/sessions/{second['session_id']}/events", json={"events": event})
    assert answer.status_code == 200 and answer.json() == {"accepted": 1, "duplicates": 0}, answer.text


def test_excluded_sessions_wait_unlearned(api, stack, settings, items):
    """What an improvement pass claims follows learning.exclude_sources: the test stack leaves out
    `unverified` (its default), so a session of that source (made here as the migration labels the
    anonymous ones of before) is never consumed, while a served one is."""
    assert settings.learning.exclude_sources == ["unverified"]
    served = search(api, "glacier melt and sea level", limit=3)["session_id"]
    legacy = f"legacy-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        clickstream.record_session(conn, legacy, None, "glacier", None, [(1, "prov-3")], Provenance("unverified"))
        clickstream.add_events(conn, legacy, [("e-1", "prov-3", "click")])
    assert api.post("/v1/improvement/run", params={"settle_s": 0}).status_code == 200
    improved = "SELECT improved_at IS NOT NULL FROM sessions WHERE session_id = %s"
    assert stored(stack, improved, served) is True
    assert stored(stack, improved, legacy) is False
    with psycopg.connect(stack.postgres_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM sessions WHERE session_id = %s", (legacy,))
