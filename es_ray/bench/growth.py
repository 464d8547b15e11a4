"""Growth benchmark: search latency and HNSW recall@10 as the collection grows (10k, 100k, 1M vectors).

    python -m es_ray.bench.growth --data ../shared/data/scifact --sizes 10000,100000

Only Postgres is needed: an embedded server under --state-dir (stopped at the end). Each size is a
fresh collection of N items with one stored vector each, written with COPY: item i's vector is the
SciFact chunk vector i mod n plus Gaussian noise of relative norm --noise, normalised again. Copies of
one chunk stay near each other and the collection keeps real vectors' geometry (random placeholders
would make every neighbour equally far). Each item's payload has `shard` (i mod 10) for filtered
searches that admit 10 % of the items.

Postgres starts as `es-ray up` starts it (postgres.shared_buffers applied). The HNSW index is built
once after the load (m, ef_construction and maintenance_work_mem from configs/stack.yaml), and its build
is timed, with pgvector's notice if the graph outgrew maintenance_work_mem. Searches run the serving
path's own SQL (store/search.search) on a connection configured like a Serve replica's (ef_search,
iterative scan) for the SciFact test queries, embedded in-process: p50 and p99 of the top-10, unfiltered
and filtered, after one warm-up pass, and the table and index blocks one search found in shared buffers
(hit) or read from the OS (read: its page cache here). Recall@10 compares the HNSW top-10 items with the
exact top-10 over the same stored vectors (numpy; filtered: over the items the filter admits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from psycopg import sql
from tqdm import tqdm

from es_ray.bench.common import percentiles, write_result
from es_ray.bench.corpus_vectors import collection_vectors
from es_ray.config import load_settings
from es_ray.data import beir
from es_ray.data.corpus import read_qrels, read_queries
from es_ray.inference.encoder import default_model_dir, load_encoder, load_tokenizer
from es_ray.stack import postgres
from es_ray.store import db
from es_ray.store.collections import Collection
from es_ray.store.search import search

STATE = Path("/tmp/esr-bench-growth")
SHARDS = 10
FILTER = {"shard": 3}  # admits one item in SHARDS


def query_vectors(data: Path, model_dir: Path, max_length: int) -> np.ndarray:
    """The collection's test queries, embedded in-process by the served model."""
    queries = read_queries(data / "queries.jsonl")
    texts = [queries[q] for q in sorted(read_qrels(data / "qrels" / "test.tsv")) if q in queries]
    model, tokenizer = load_encoder(model_dir), load_tokenizer(model_dir)
    with torch.inference_mode():
        out = [model(**{k: torch.from_numpy(v) for k, v in tokenizer(texts[i:i + 64], max_length=max_length,
                                                                      truncation=True, padding=True,
                                                                      return_tensors="np").items()
                        if k in ("input_ids", "attention_mask")}).numpy() for i in range(0, len(texts), 64)]
    return np.concatenate(out)


def noisy_vectors(base: np.ndarray, n: int, noise: float, seed: int = 0, block: int = 100_000) -> np.ndarray:
    """n unit vectors: base row i mod len(base) plus Gaussian noise of norm about `noise`. Made a block at a
    time, so 1M x 384 takes its own 1.5 GB and little more."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    for start in range(0, n, block):
        rows = base[np.arange(start, min(start + block, n)) % len(base)]
        rows = rows + rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(noise / np.sqrt(base.shape[1]))
        out[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def load_collection(conn, collection: Collection, vectors: np.ndarray, batch: int = 20000) -> float:
    """Writes item g<i> with vectors[i] by COPY; returns the seconds it took."""
    started = time.perf_counter()
    collection.create(conn, index=False)
    for start in tqdm(range(0, len(vectors), batch), desc=f"copy {len(vectors)}", unit="batch"):
        end = min(start + batch, len(vectors))
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} (object_id, payload, version) FROM STDIN").format(collection.items)) as copy:
                for i in range(start, end):
                    copy.write_row((f"g{i}", json.dumps({"shard": i % SHARDS}), 1))
            with cur.copy(sql.SQL("COPY {} (object_id, part_no, is_average, vector) FROM STDIN WITH (FORMAT BINARY)"
                                  ).format(collection.parts)) as copy:
                copy.set_types(["text", "int4", "bool", "vector"])
                for i in range(start, end):
                    copy.write_row((f"g{i}", 0, False, vectors[i]))
    conn.execute(sql.SQL("ANALYZE {}").format(collection.items))
    conn.execute(sql.SQL("ANALYZE {}").format(collection.parts))
    return time.perf_counter() - started


def timed_searches(conn, collection: Collection, queries: np.ndarray, filter_: dict | None
                   ) -> tuple[list[float], list[list[str]]]:
    seconds, found = [], []
    for q in queries:
        started = time.perf_counter()
        hits = search(conn, collection, q, 10, filter_=filter_)
        seconds.append(time.perf_counter() - started)
        found.append([h.id for h in hits])
    conn.commit()
    return seconds, found


def exact_top10(vectors: np.ndarray, queries: np.ndarray, admitted: np.ndarray) -> list[set[str]]:
    """The exact top-10 item ids of each query over the admitted item numbers (numpy, 50 queries at a time)."""
    subset = vectors[admitted]
    found = []
    for start in range(0, len(queries), 50):
        scores = queries[start:start + 50] @ subset.T
        found += [{f"g{admitted[j]}" for j in row} for row in np.argpartition(-scores, 10, axis=1)[:, :10]]
    return found


def recall_at_10(exact: list[set[str]], found: list[list[str]]) -> float:
    """Share of the exact top-10 that the HNSW search returned."""
    return sum(len(e & set(ids)) for e, ids in zip(exact, found)) / (10 * len(exact))


def blocks_read(conn, collection: Collection) -> tuple[int, int]:
    """(hit, read): the collection's table and index blocks found in shared buffers and read from the OS
    (its page cache or disk) so far, from Postgres' I/O statistics."""
    conn.execute("SELECT pg_stat_force_next_flush()")
    conn.commit()  # a backend sends its counts when its transaction ends
    row = conn.execute("""SELECT sum(coalesce(heap_blks_hit, 0) + coalesce(idx_blks_hit, 0)),
                                 sum(coalesce(heap_blks_read, 0) + coalesce(idx_blks_read, 0))
                          FROM pg_statio_user_tables WHERE relname = ANY(%s)""",
                       ([f"items_{collection.name}", f"parts_{collection.name}"],)).fetchone()
    conn.commit()
    return int(row[0]), int(row[1])


def measure_size(dsn: str, settings, n: int, base: np.ndarray, queries: np.ndarray, noise: float,
                 ef_values: list[int], work_mem: str) -> dict:
    vectors = noisy_vectors(base, n, noise)
    collection = Collection(f"growth_{n}", vectors.shape[1])
    pg = settings.postgres
    notices: list[str] = []
    with db.connect(dsn) as conn:
        collection.drop(conn)
        load_s = load_collection(conn, collection, vectors)
        # pgvector says when the graph outgrew maintenance_work_mem (the build then slows down several times)
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        started = time.perf_counter()
        collection.create_index(conn, pg.hnsw_m, pg.hnsw_ef_construction, work_mem=work_mem)
        build_s = time.perf_counter() - started
        index_mb = conn.execute("SELECT pg_relation_size(%s) / 1e6", (f"parts_{collection.name}_hnsw",)).fetchone()[0]
    result = {"vectors": n, "copy_s": round(load_s, 1), "hnsw_build_s": round(build_s, 1),
              "index_mb": round(float(index_mb), 1), "build_notices": notices}
    cases = (("unfiltered", None, np.arange(n)), ("filtered", FILTER, np.arange(FILTER["shard"], n, SHARDS)))
    exact = {label: exact_top10(vectors, queries, admitted) for label, _, admitted in cases}
    # The configured ef_search first (the headline), then the others: what raising it would buy and cost.
    for ef in [pg.hnsw_ef_search] + [e for e in ef_values if e != pg.hnsw_ef_search]:
        pool = db.open_pool(dsn, 1, ef)  # configured as a Serve replica's connections
        measured = {}
        try:
            with pool.connection() as conn:
                for label, filter_, _ in cases:
                    timed_searches(conn, collection, queries, filter_)  # warm-up: index and heap into shared buffers
                    before = blocks_read(conn, collection)
                    seconds, found = timed_searches(conn, collection, queries, filter_)
                    after = blocks_read(conn, collection)
                    measured[label] = {**percentiles(seconds), "recall_at_10": round(recall_at_10(exact[label], found), 4)}
                    # per search: blocks found in shared buffers, and those read from the OS's page cache
                    measured[label]["blocks_hit"] = round((after[0] - before[0]) / len(queries), 1)
                    measured[label]["blocks_read"] = round((after[1] - before[1]) / len(queries), 1)
        finally:
            pool.close()
        if ef == pg.hnsw_ef_search:
            result.update(measured)
        else:
            result.setdefault("other_ef_search", {})[str(ef)] = measured
    with db.connect(dsn) as conn:
        result["table_mb"] = round(float(conn.execute("SELECT pg_total_relation_size(%s) / 1e6",
                                                (f"parts_{collection.name}",)).fetchone()[0]), 1)
        collection.drop(conn)
    print(json.dumps(result))  # noqa: T201 - progress: one line per size
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--sizes", default="10000,100000", help="stored vectors per run, comma separated")
    parser.add_argument("--noise", type=float, default=0.5,
                        help="relative norm of the noise added to each copy (0.5: cosine about 0.9 to its chunk)")
    parser.add_argument("--ef-search", default="",
                        help="other hnsw.ef_search values measured beside the configured one, comma separated")
    parser.add_argument("--maintenance-work-mem", default=None,
                        help="for the HNSW builds (default postgres.maintenance_work_mem); a build whose graph "
                             "fits in it runs several times faster: 1M vectors of 384 dims fit in 3GB")
    parser.add_argument("--scratch", default="",
                        help="an experiment's name: the result goes to /tmp/esr-bench-scratch, not bench/results")
    parser.add_argument("--state-dir", type=Path, default=STATE)
    args = parser.parse_args(argv)

    settings = load_settings(args.state_dir)
    work_mem = args.maintenance_work_mem or settings.postgres.maintenance_work_mem
    data = beir.locate(args.data, args.state_dir)
    model_dir = default_model_dir()
    m = settings.model
    base = collection_vectors(data, model_dir, m.max_length, m.chunk_overlap, m.max_chunks).chunks
    queries = query_vectors(data, model_dir, m.max_length)
    dsn = postgres.start(args.state_dir, settings.postgres.shared_buffers)  # as `es-ray up` starts it
    try:
        db.migrate(dsn)
        with db.connect(dsn) as conn:
            shared_buffers, build_workers = conn.execute(
                "SELECT current_setting('shared_buffers'), current_setting('max_parallel_maintenance_workers')").fetchone()
        ef_values = [int(e) for e in args.ef_search.split(",") if e]
        command = (f"python -m es_ray.bench.growth --sizes {args.sizes}"
                   + (f" --ef-search {args.ef_search}" if args.ef_search else "")
                   + (f" --maintenance-work-mem {args.maintenance_work_mem}" if args.maintenance_work_mem else ""))
        sizes = []
        for n in args.sizes.split(","):
            sizes.append(measure_size(dsn, settings, int(n), base, queries, args.noise, ef_values, work_mem))
            p50 = [s["unfiltered"]["p50_ms"] for s in sizes]
            result = {"benchmark": "growth", "sizes": sizes, "queries": len(queries), "base_vectors": len(base),
                      "noise": args.noise, "hnsw_m": settings.postgres.hnsw_m,
                      "hnsw_ef_construction": settings.postgres.hnsw_ef_construction,
                      "ef_search": settings.postgres.hnsw_ef_search,
                      "maintenance_work_mem": work_mem, "max_parallel_maintenance_workers": int(build_workers),
                      "shared_buffers": shared_buffers, "shared_buffers_setting": settings.postgres.shared_buffers,
                      "p50_largest_to_smallest": round(p50[-1] / p50[0], 2),
                      "min_recall_at_10": min(min(s["unfiltered"]["recall_at_10"], s["filtered"]["recall_at_10"])
                                              for s in sizes),
                      "note": "targets: p50 at the largest size <= 1.5 x p50 at the smallest; recall@10 >= 0.95 "
                              "(filtered included) at the configured ef_search"}
            # written after every size: a run stopped during a large size keeps the smaller ones
            out = write_result("growth", data.name, result, command, scratch=args.scratch)
    finally:
        postgres.stop(args.state_dir)
    print(json.dumps(result, indent=2), f"\nwritten to {out}")  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
