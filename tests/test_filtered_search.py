"""A selective filter still gets a full page of the right items from the HNSW index (stack's Postgres).

A replica's connections (store/db.open_pool) scan the index iteratively (hnsw.iterative_scan): without
that a scan ends after hnsw.ef_search candidates, and a filter that admits one item in a hundred finds
about one of them there. The planner searches a table this small exactly, so the test turns the other
plans off on its connection: the HNSW path a large collection takes is the one under test, and the test
shows it took it (the same search without iterative scan comes up short).
"""

import numpy as np
from psycopg import sql

from es_ray.store import db
from es_ray.store.collections import Collection, EmbeddedItem
from es_ray.store.search import search

N, DIM, K, RARE_EVERY = 5000, 16, 10, 100


def test_a_filter_admitting_one_item_in_a_hundred_returns_the_k_nearest_of_them(scratch_database, settings):
    dsn = scratch_database("esr_filtered_search")
    db.migrate(dsn)
    pg = settings.postgres
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    collection = Collection("filtered", DIM)
    with db.connect(dsn) as conn:
        collection.create(conn, index=False)
        collection.upsert(conn, [EmbeddedItem(id=f"i{n}", payload={"tag": "rare" if n % RARE_EVERY == 0 else "common"},
                                              chunks=vectors[n:n + 1]) for n in range(N)])
        collection.create_index(conn, pg.hnsw_m, pg.hnsw_ef_construction)
        for table in (collection.items, collection.parts):
            conn.execute(sql.SQL("ANALYZE {}").format(table))

    query = vectors[1]  # a common item: its own neighbourhood is common items
    rare = np.arange(0, N, RARE_EVERY)
    exact = [f"i{n}" for n in rare[np.argsort(-(vectors[rare] @ query))[:K]]]

    pool = db.open_pool(dsn, 1, pg.hnsw_ef_search)  # configured as a Serve replica's connections are
    try:
        with pool.connection() as conn:
            conn.execute("SET enable_seqscan = off")
            conn.execute("SET enable_bitmapscan = off")
            conn.execute("SET enable_sort = off")  # an exact plan sorts every admitted row by distance
            conn.commit()
            hits = search(conn, collection, query, K, filter_={"tag": "rare"})
            assert [h.id for h in hits] == exact
            assert [h.payload["tag"] for h in hits] == ["rare"] * K

            conn.execute("SET hnsw.iterative_scan = off")
            conn.commit()
            short = search(conn, collection, query, K, filter_={"tag": "rare"})
            assert len(short) < K, "the search did not take the HNSW path, so the test shows nothing"
    finally:
        pool.close()
