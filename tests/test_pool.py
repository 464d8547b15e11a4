"""The Postgres pools a Serve replica keeps (store/db.py): a connection whose server went away is replaced
before anybody uses it, a healthy one is handed out without a round trip, and the search pool's connections
carry the search's statement timeout from the moment they open."""

from __future__ import annotations

import time
from unittest import mock

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from es_ray.store import clickstream, db
from es_ray.store.search import Ranking, SearchTimeout, search_mode
from tests.helpers import COSTLY_FILTER, slow_collection


def test_a_terminated_connection_is_replaced_at_checkout_and_a_healthy_one_costs_no_round_trip(scratch_database):
    dsn = scratch_database("esr_pool_alive")
    db.migrate(dsn)  # the pool registers pgvector's type on each connection
    pool = db.open_pool(dsn, 1, timeout_s=5)
    try:
        with pool.connection() as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
        # psycopg_pool's own check (an empty query, one round trip) runs only where the socket holds something.
        with mock.patch.object(ConnectionPool, "check_connection", wraps=ConnectionPool.check_connection) as full:
            with pool.connection() as conn:
                assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
            assert full.call_count == 0
            with psycopg.connect(dsn, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))
            time.sleep(0.2)  # the server's goodbye reaches the idle connection's socket
            with pool.connection() as conn:  # no error: the dead one is found and another one opened
                assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid
            assert full.call_count == 1
        assert pool.get_stats().get("connections_lost", 0) == 1
    finally:
        pool.close()


def test_the_search_pool_bounds_every_statement_and_records_a_session_without_a_transaction(scratch_database):
    dsn = scratch_database("esr_pool_search")
    db.migrate(dsn)
    with db.connect(dsn) as conn:
        collection, vectors = slow_collection(conn)
    costly = COSTLY_FILTER
    for timeout_ms, times_out in ((20, True), (60_000, False)):
        pool = db.open_pool(dsn, 1, timeout_s=5, statement_timeout_ms=timeout_ms, autocommit=True)
        try:
            with pool.connection() as conn:
                assert conn.autocommit
                assert conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'statement_timeout'"
                                    ).fetchone()[0] == timeout_ms
                if times_out:
                    with pytest.raises(SearchTimeout, match="postgres.search_timeout_ms"):
                        search_mode(conn, collection, Ranking(), "", vectors[0], 10, filter_=costly)
                    continue
                hits = search_mode(conn, collection, Ranking(), "", vectors[0], 10, filter_=costly)
                assert [h.id for h in hits][:1] == ["i0"] and hits[0].dense_rank == 1
                shown = [(rank, h.id) for rank, h in enumerate(hits, start=1)]
                assert clickstream.record_session(conn, "s1", None, "q", 1, shown, clickstream.Provenance("served"),
                                                  mode="dense", list_ranks={h.id: (h.dense_rank, None) for h in hits})
                # Committed by the statement itself: another connection sees the session and its shown list.
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                with db.connect(dsn) as other:
                    stored = clickstream.get_session(other, "s1")
                assert stored.results == shown and stored.list_ranks == {h.id: (r, None) for r, h in
                                                                        enumerate(hits, start=1)}
        finally:
            pool.close()
