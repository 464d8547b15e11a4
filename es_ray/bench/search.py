"""Search benchmark: HTTP latency at 1 and 8 clients beside its two parts, and HNSW recall@10.

    python -m es_ray.bench.search --data ../shared/data/scifact

Runs against the benchmark stack (loads --docs documents through the upsert job if the collection
holds fewer). In the same run it times the parts alone: the Triton query-embedding call (tokenise +
gRPC) and the plain pgvector HNSW top-10 query, and reports ratio = end-to-end p50 / (sum of part
p50s). Recall compares the HNSW top-10 (at the configured ef_search) with exact search over the same
stored vectors, for every test query.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from es_ray.bench.common import DEFAULT_STATE, bench_stack, percentiles, write_result
from es_ray.client import EsRayClient
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.stack import jobs
from es_ray.stack.manifest import StackManifest
from es_ray.store import db, blue_green
from es_ray.store.collections import Collection

PLAIN_TOP10 = ("SELECT object_id, vector <=> %s AS distance FROM parts_{c} WHERE NOT is_average "
               "ORDER BY vector <=> %s LIMIT 10")


def load_if_needed(settings, manifest, data: Path, docs: int) -> int:
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        count = Collection(blue.collection, blue.dim).count(conn)
    if count >= docs:
        return count
    corpus = list(read_corpus(data / "corpus.jsonl"))
    random.Random(1).shuffle(corpus)
    path = settings.state_path / "bench" / f"search-{data.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in corpus[:docs]))
    status, logs = jobs.submit_and_wait(manifest, f"python -m es_ray.data.upsert --input {path}", echo_logs=False)
    if status != "SUCCEEDED":
        raise SystemExit(f"upsert job {status}:\n{logs[-3000:]}")
    with db.connect(manifest.postgres_dsn) as conn:
        return Collection(blue.collection, blue.dim).count(conn)


def http_level(manifest: StackManifest, queries: list[str], clients: int, per_client: int) -> dict:
    """`clients` threads sending `per_client` searches each, back to back, with the API key: this measures
    the service's capacity, and a client this fast is what the per-client rate limits refuse."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def worker(offset: int) -> None:
        with EsRayClient.for_stack(manifest, timeout=60) as client:
            mine = []
            for k in range(per_client):
                request = client.search_request(queries[(offset * per_client + k) % len(queries)], limit=10)
                started = time.perf_counter()  # the exchange alone, as an HTTP client sees it: no parsing
                response = client.send("POST", "/v1/search", request)
                mine.append(time.perf_counter() - started)
                if response.status_code != 200:
                    failures[0] += 1
            with lock:
                latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"clients": clients, **percentiles(latencies), "requests_per_s": round(len(latencies) / wall, 1),
            "failed": failures[0]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=1000, help="documents in the collection (loaded if fewer)")
    parser.add_argument("--requests", type=int, default=200, help="requests per level per client (1 client)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    docs = load_if_needed(settings, manifest, data, args.docs)
    queries_by_id = read_queries(data / "queries.jsonl")
    test_ids = sorted(read_qrels(data / "qrels" / "test.tsv"))
    queries = [queries_by_id[q] for q in test_ids if q in queries_by_id]
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)

    # The parts alone, measured in this run.
    encoder = TritonEncoder.of(manifest.triton_grpc_url, QUERY_ENCODER, blue, settings)  # as the Serve replica does
    for query in queries[:5]:
        encoder.embed_queries([query])  # warm-up
    embed_s, vectors = [], []
    for query in tqdm(queries[:args.requests], desc="embed alone"):
        started = time.perf_counter()
        vectors.append(encoder.embed_queries([query])[0])
        embed_s.append(time.perf_counter() - started)
    pool = db.open_pool(manifest.postgres_dsn, 1, settings.postgres.hnsw_ef_search)
    pg_s = []
    with pool.connection() as conn:
        sql = PLAIN_TOP10.format(c=blue.collection)
        for vector in tqdm(vectors, desc="pgvector alone"):
            started = time.perf_counter()
            conn.execute(sql, (vector, vector)).fetchall()
            pg_s.append(time.perf_counter() - started)
    parts = {"embed": percentiles(embed_s)["p50_ms"], "pgvector": percentiles(pg_s)["p50_ms"]}

    http_level(manifest, queries, 1, 20)  # warm-up
    levels = []
    for clients in (1, 8):
        level = http_level(manifest, queries, clients, max(args.requests // clients, 25))
        level["ratio"] = round(level["p50_ms"] / (parts["embed"] + parts["pgvector"]), 2)
        levels.append(level)
    one = levels[0]
    result = {"benchmark": "search", "docs": docs, "p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"], "clients": 1,
              "parts_p50_ms": parts, "ratio": one["ratio"], "levels": levels,
              "note": "ratio = HTTP p50 / (embed p50 + pgvector p50); at 8 clients on 2 cores requests queue"}
    out = write_result("search", data.name, result, f"python -m es_ray.bench.search --docs {args.docs}")
    print(json.dumps(result, indent=2), f"\nwritten to {out}")  # noqa: T201 - the benchmark's report

    recall = measure_recall(manifest, blue, vectors_for_all(encoder, queries), settings.postgres.hnsw_ef_search)
    recall.update({"benchmark": "recall", "docs": docs, "queries": len(queries)})
    out = write_result("recall", data.name, recall, f"python -m es_ray.bench.search --docs {args.docs}")
    print(json.dumps(recall, indent=2), f"\nwritten to {out}")  # noqa: T201


def vectors_for_all(encoder: TritonEncoder, queries: list[str]) -> np.ndarray:
    return np.concatenate([encoder.embed_queries(queries[i:i + 32]) for i in range(0, len(queries), 32)])


def measure_recall(manifest, blue, query_vectors: np.ndarray, ef_search: int) -> dict:
    """HNSW top-10 chunk ids vs exact top-10 over the same stored chunk vectors (numpy brute force)."""
    with db.connect(manifest.postgres_dsn) as conn:
        rows = conn.execute(f"SELECT object_id, part_no, vector FROM parts_{blue.collection} WHERE NOT is_average"
                            ).fetchall()
        keys = [(r[0], r[1]) for r in rows]
        matrix = np.stack([r[2].to_numpy() for r in rows])
        conn.execute(f"SET hnsw.ef_search = {int(ef_search)}")
        hits = 0
        for vector in tqdm(query_vectors, desc="recall"):
            exact = np.argsort(-(matrix @ vector), kind="stable")[:10]
            approx = conn.execute(f"SELECT object_id, part_no FROM parts_{blue.collection} WHERE NOT is_average "
                                  "ORDER BY vector <=> %s LIMIT 10", (vector,)).fetchall()
            hits += len({keys[i] for i in exact} & {tuple(r) for r in approx})
    return {"recall_at_10": round(hits / (10 * len(query_vectors)), 4), "ef_search": ef_search,
            "vectors": len(keys)}


if __name__ == "__main__":
    main()
