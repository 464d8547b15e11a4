"""Search benchmark: HTTP latency at 1 and 8 clients beside its two parts and the model's own speed,
and HNSW recall@10.

    python -m es_ray.bench.search --data ../shared/data/scifact [--flamegraph docs]

Runs against the benchmark stack (loads --docs documents through the upsert job if the collection
holds fewer). At 1 client it times the parts in turn with each search (one_client): the Triton
query-embedding call (tokenise + gRPC) and the plain pgvector top-10 query, and reports ratio =
end-to-end p50 / (sum of part p50s) and overhead_ms = end-to-end p50 - the part p50s (what the
serving path itself costs: HTTP, Ray Serve, FastAPI, auth, the session record). Beside them, the
fastest forward pass of the blue query encoder in this process (fastest_forward: the faster of 1 thread
and every core, each timed by fastest_query_forward_ms): embed_to_fastest = served embedding p50 / one query's forward pass, and throughput_ratio = 8-client
requests/s / the forward pass's queries/s at the batch size Triton's dynamic batcher formed during
the 8-client level (its statistics: inferences / executions). Recall compares the HNSW top-10 (at
the configured ef_search) with exact search over the same stored vectors, for every test query.
The HTTP clients are bench/http_load.py's (the standard library's http.client: the load shares the
machine it measures); at 1 client each search is also sent with es-ray's httpx client, whose p50 and
CPU per request the result reports beside (with_httpx_client).

--flamegraph DIR: afterwards, one more 8-client level (not in the results) with py-spy recording the
Serve replica and the Serve proxy: DIR/flamegraph-search-replica.svg and DIR/flamegraph-search-proxy.svg.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from tqdm import tqdm

from es_ray.bench.common import DEFAULT_STATE, bench_stack, percentiles, write_result
from es_ray.bench.http_load import LeanClient
from es_ray.client import EsRayClient
from es_ray.config import ServeSettings
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.inference.triton_client import TritonEncoder, query_padding
from es_ray.inference.encoder import load_tokenizer
from es_ray.inference.triton_repo import QUERY_ENCODER, model_file, version_dir
from es_ray.stack import jobs, triton
from es_ray.stack.manifest import StackManifest
from es_ray.store import blue_green, clickstream, db
from es_ray.store.collections import Collection
from es_ray.store.search import Ranking, search_mode

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
    the service's capacity, and a client this fast is what the per-client rate limits refuse. Each thread
    is a LeanClient (bench/http_load.py)."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def worker(offset: int) -> None:
        with LeanClient.for_stack(manifest) as client:
            mine = []
            for k in range(per_client):
                request = EsRayClient.search_request(queries[(offset * per_client + k) % len(queries)], limit=10)
                started = time.perf_counter()  # the exchange alone, as an HTTP client sees it: no parsing
                status = client.send("POST", "/v1/search", request)
                mine.append(time.perf_counter() - started)
                if status != 200:
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


def status_of(answer) -> int:
    """LeanClient.send answers the status; EsRayClient.send the httpx response."""
    return answer if isinstance(answer, int) else answer.status_code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=1000, help="documents in the collection (loaded if fewer)")
    parser.add_argument("--requests", type=int, default=200, help="requests per level per client (1 client)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--flamegraph", type=Path, default=None,
                        help="folder for py-spy flame graphs of the replica and proxy under 8 clients")
    args = parser.parse_args(argv)

    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    docs = load_if_needed(settings, manifest, data, args.docs)
    queries_by_id = read_queries(data / "queries.jsonl")
    test_ids = sorted(read_qrels(data / "qrels" / "test.tsv"))
    queries = [queries_by_id[q] for q in test_ids if q in queries_by_id]
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)

    encoder = TritonEncoder.of(manifest.triton_grpc_url, QUERY_ENCODER, blue, settings)  # as the Serve replica does
    for query in queries[:5]:
        encoder.embed_queries([query])  # warm-up
    pool = db.open_pool(manifest.postgres_dsn, 1, settings.postgres.hnsw_ef_search)
    # The route's own query and the session record run on a connection like the replica's search
    # connections (db.open_pool: autocommit, the statement timeout set when it opens).
    search_pool = db.open_pool(manifest.postgres_dsn, 1, settings.postgres.hnsw_ef_search,
                               statement_timeout_ms=settings.postgres.search_timeout_ms, autocommit=True)
    http_level(manifest, queries, 1, 20)  # warm-up
    one, parts, diagnostics, with_httpx = one_client(manifest, encoder, pool, search_pool, blue, queries,
                                                     args.requests)
    # Where the overhead may go besides (not parts of the ratio): the session record of a search (one
    # INSERT) and the HTTP + Serve + FastAPI floor (GET /healthz answers from its cache: no dependency is
    # asked, no body is read).
    diagnostics.update(session_write=session_write_ms(search_pool, blue), healthz=healthz_p50(manifest))

    before, cpu = batcher_counts(encoder), cpu_seconds()
    # 8 clients send 4x the requests of one (800 at the default): a p99 of 200 would be its 2nd slowest
    eight = http_level(manifest, queries, 8, max(args.requests // 2, 25))
    eight["cpu_ms_per_request"] = cpu_per_request(cpu, cpu_seconds(), eight["n"])
    eight["ratio"] = round(eight["p50_ms"] / (parts["embed"] + parts["pgvector"]), 2)
    eight["triton_batch"] = formed_batch(before, batcher_counts(encoder))
    levels = [one, eight]
    # serve.ingress direct: the same 1-client level through Serve's proxy, which still runs beside the
    # replica, tells in this run what the hop through it costs.
    via_proxy = None
    if manifest.serve_proxy_url:
        proxied = manifest.model_copy(update={"serve_url": manifest.serve_proxy_url})
        level = http_level(proxied, queries, 1, args.requests)
        via_proxy = {"p50_ms": level["p50_ms"], "p99_ms": level["p99_ms"], "healthz_p50_ms": healthz_p50(proxied),
                     "overhead_ms": round(level["p50_ms"] - parts["embed"] - parts["pgvector"], 2)}
    repository = triton.model_repository(settings.state_path)
    model_path = model_file(version_dir(repository, QUERY_ENCODER, blue.model_version))
    fastest = fastest_forward(model_path, blue.source_dir, blue.max_length, query_padding(settings),
                              queries, eight["triton_batch"])
    result = {"benchmark": "search", "docs": docs, "p50_ms": one["p50_ms"], "p99_ms": one["p99_ms"], "clients": 1,
              "parts_p50_ms": parts, "diagnostics_p50_ms": diagnostics, "ratio": one["ratio"], "levels": levels,
              "overhead_ms": round(one["p50_ms"] - parts["embed"] - parts["pgvector"], 2),
              "fastest_forward": fastest,
              "embed_to_fastest": round(parts["embed"] / fastest["query_ms"], 2),
              "throughput_8": eight["requests_per_s"], "fastest_throughput": fastest["queries_per_s"],
              "throughput_ratio": round(eight["requests_per_s"] / fastest["queries_per_s"], 2),
              "p99_to_p50_8": round(eight["p99_ms"] / eight["p50_ms"], 2),
              "query_cache_entries": settings.serve.query_cache_entries,  # 0: every search embedded (bench_stack)
              "via_proxy": via_proxy, "with_httpx_client": with_httpx, "client": "http.client (bench/http_load.py)",
              "ingress": "direct" if manifest.serve_proxy_url else "proxy",
              "note": "ratio = HTTP p50 / (embed p50 + pgvector p50); overhead_ms = HTTP p50 - embed p50 - "
                      "pgvector p50 (1 client, each search's parts timed in turn with it; "
                      "diagnostics_p50_ms.pgvector_in_a_loop: the same top-10s back to back); embed_to_fastest = "
                      "embed p50 / one query's forward pass in-process; throughput_ratio = 8-client requests/s / the forward "
                      "pass's queries/s at the batch Triton formed (each forward pass the faster of 1 thread and all cores)"}
    measured = "direct" if manifest.serve_proxy_url else "proxy"
    # The command as run: an ingress other than configs/stack.yaml's came from the environment.
    ingress = "" if measured == ServeSettings().ingress else f"ES_RAY_SERVE__INGRESS={measured} "
    out = write_result("search", data.name, result, f"{ingress}python -m es_ray.bench.search --docs {args.docs}")
    print(json.dumps(result, indent=2), f"\nwritten to {out}")  # noqa: T201 - the benchmark's report
    if args.flamegraph:
        flame_graphs(manifest, queries, args.flamegraph, settings.serve.app_name)

    recall = measure_recall(manifest, blue, vectors_for_all(encoder, queries), settings.postgres.hnsw_ef_search)
    recall.update({"benchmark": "recall", "docs": docs, "queries": len(queries)})
    out = write_result("recall", data.name, recall, f"python -m es_ray.bench.search --docs {args.docs}")
    print(json.dumps(recall, indent=2), f"\nwritten to {out}")  # noqa: T201


def one_client(manifest: StackManifest, encoder: TritonEncoder, pool, search_pool, blue, queries: list[str],
               n: int) -> tuple[dict, dict, dict, dict]:
    """The 1-client level and its parts, each query's exchanges back to back: the served embedding call
    (tokenise + Triton, as the replica makes it), the plain pgvector top-10 with its vector, the route's
    own query (store/search.py: chunks grouped per item, payloads), and the whole search over HTTP with
    the benchmark's client and with es-ray's httpx client (which of the two goes first alternates). The
    machine's speed drifts by 10-40 % between minutes on this machine kind; measured in turn, every part
    sees the same drift, and the overhead (a difference of p50s) is not one phase against another.
    Returns (level, parts, diagnostics, the httpx client's figures)."""
    took: dict[str, list[float]] = {k: [] for k in ("embed", "pgvector", "search_sql", "lean", "httpx")}
    client_cpu: dict[str, list[float]] = {"lean": [], "httpx": []}
    failures, vectors = 0, []
    collection, plain = Collection(blue.collection, blue.dim), PLAIN_TOP10.format(c=blue.collection)
    with LeanClient.for_stack(manifest) as lean, EsRayClient.for_stack(manifest, timeout=60) as rich, \
            pool.connection() as conn, search_pool.connection() as search_conn:
        for k in tqdm(range(n), desc="1 client, parts in turn"):
            query = queries[k % len(queries)]
            started = time.perf_counter()
            vector = encoder.embed_queries([query])[0]
            took["embed"].append(time.perf_counter() - started)
            vectors.append(vector)
            started = time.perf_counter()
            conn.execute(plain, (vector, vector)).fetchall()
            took["pgvector"].append(time.perf_counter() - started)
            started = time.perf_counter()
            search_mode(search_conn, collection, Ranking(), "", vector, 10)
            took["search_sql"].append(time.perf_counter() - started)
            request = EsRayClient.search_request(query, limit=10)
            order = (("lean", lean), ("httpx", rich)) if k % 2 == 0 else (("httpx", rich), ("lean", lean))
            for name, client in order:
                cpu, started = time.thread_time(), time.perf_counter()  # the exchange alone: no parsing
                status = status_of(client.send("POST", "/v1/search", request))
                took[name].append(time.perf_counter() - started)
                client_cpu[name].append(time.thread_time() - cpu)
                failures += name == "lean" and status != 200
        # The same top-10s again, back to back: in turn with the rest they meet the caches the embedding
        # left (as the route's own query does), and take longer than in a loop of their own.
        looped = []
        for vector in vectors:
            started = time.perf_counter()
            conn.execute(plain, (vector, vector)).fetchall()
            looped.append(time.perf_counter() - started)
    p50 = {name: percentiles(samples)["p50_ms"] for name, samples in took.items()}
    parts = {"embed": p50["embed"], "pgvector": p50["pgvector"]}
    level = {"clients": 1, **percentiles(took["lean"]), "failed": failures,
             "ratio": round(p50["lean"] / (parts["embed"] + parts["pgvector"]), 2), "triton_batch": 1.0}
    with_httpx = {"p50_ms": p50["httpx"], "overhead_ms": round(p50["httpx"] - parts["embed"] - parts["pgvector"], 2),
                  "client_cpu_ms": percentiles(client_cpu["httpx"])["p50_ms"],
                  "lean_client_cpu_ms": percentiles(client_cpu["lean"])["p50_ms"]}
    diagnostics = {"search_sql": p50["search_sql"], "pgvector_in_a_loop": percentiles(looped)["p50_ms"]}
    return level, parts, diagnostics, with_httpx


def session_write_ms(pool, blue, n: int = 100) -> float:
    """p50 ms of recording one search's session (10 shown results) on a pooled connection."""
    with pool.connection() as conn:
        ids = [r[0] for r in conn.execute(f"SELECT object_id FROM items_{blue.collection} LIMIT 10")]
        took = []
        for _ in range(n):
            started = time.perf_counter()
            clickstream.record_session(conn, f"bench-{uuid.uuid4().hex}", None, "bench session write",
                                       blue.model_version, list(enumerate(ids, start=1)),
                                       clickstream.Provenance("served", "bench", "bench"))
            took.append(time.perf_counter() - started)
    return percentiles(took)["p50_ms"]


def healthz_p50(manifest: StackManifest, n: int = 200) -> float:
    with LeanClient.for_stack(manifest) as client:
        client.send("GET", "/healthz")
        took = []
        for _ in range(n):
            started = time.perf_counter()
            client.send("GET", "/healthz")
            took.append(time.perf_counter() - started)
    return percentiles(took)["p50_ms"]


# Process title or name -> what it is, for the CPU each part of the machine spends on a request.
ROLES = [("ServeReplica", "serve replica"), ("ProxyActor", "serve proxy"), ("ServeController", "serve controller"),
         ("triton_python_backend_stub", "triton stub"), ("tritonserver", "tritonserver"), ("postgres", "postgres"),
         ("raylet", "raylet"), ("gcs_server", "gcs"), ("ray::", "other ray workers")]


def _role(pid: int, command: str) -> str:
    if pid == os.getpid():
        return "benchmark clients"
    return next((role for marker, role in ROLES if marker in command), "other")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (role, user + system CPU seconds) of every process on the machine."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        command = " ".join(proc.info["cmdline"] or [proc.info["name"] or ""])
        found[proc.info["pid"]] = (_role(proc.info["pid"], command), times.user + times.system)
    return found


def cpu_per_request(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], n: int) -> dict:
    """CPU ms per request by role between two readings (the machine runs nothing else: the shared lock)."""
    by_role: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        by_role[role] = by_role.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    ranked = sorted(((round(1000 * s / n, 2), r) for r, s in by_role.items() if s > 0), reverse=True)
    return {"total": round(sum(ms for ms, _ in ranked), 2), **{role: ms for ms, role in ranked}}


def batcher_counts(encoder: TritonEncoder) -> tuple[int, int]:
    """(inference_count, execution_count) of the encoder's Triton model: requests' rows and forward passes."""
    stats = encoder.client.get_inference_statistics(encoder.model_name, encoder.model_version, as_json=True)
    model = stats["model_stats"][0]
    return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))


def formed_batch(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Mean rows per forward pass that Triton's dynamic batcher formed between two readings."""
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return round(inferences / executions, 2) if executions else 1.0


def fastest_query_forward_ms(model_path: Path, ids: np.ndarray, mask: np.ndarray, threads: int = 1,
                             repeats: int = 30) -> float:
    """p50 ms of one forward pass of the query encoder over (ids, mask), in this process: the model's own
    speed, with no serving around it, in the runtime Triton serves the file with (model.onnx in ONNX
    Runtime, built as the python backend builds it; model.pt in TorchScript) at `threads` threads."""
    run = _forward(model_path, threads)
    for _ in range(3):
        run(ids, mask)  # warm-up: both runtimes optimise on their first calls
    took = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(ids, mask)
        took.append(time.perf_counter() - started)
    return float(np.median(took) * 1000)


_loaded: dict[tuple[Path, int], object] = {}


def _forward(path: Path, threads: int):
    """The served file's forward pass (bench/runtimes.served_forward), loaded once per thread count."""
    from es_ray.bench.runtimes import served_forward

    if (path, threads) not in _loaded:
        _loaded[path, threads] = served_forward(path, threads)
    return _loaded[path, threads]


def fastest_forward(model_path: Path, tokenizer_dir: str, max_length: int, pad_multiple: int, queries: list[str],
                    batch: float, rounds: int = 3) -> dict:
    """One query's forward pass (p50 over many queries) and the queries/s of forward passes at the batch
    size Triton formed, each at 1 thread and at every core (the faster counts: the issue's limit is the
    fastest pass on the machine, whatever the stub is set to), each tokenised as the served path tokenises
    (padded to a multiple of pad_multiple). Thread counts take turns over `rounds` rounds and each keeps
    its best round: two threads need both cores, and a slow minute must not make the limit look slower."""
    tokenizer = load_tokenizer(tokenizer_dir)

    def encoded(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        out = tokenizer(texts, max_length=max_length, truncation=True, padding=True,
                        pad_to_multiple_of=pad_multiple, return_tensors="np")
        return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)

    size = max(1, round(batch))
    batches = [queries[i:i + size] for i in range(0, min(len(queries), 20 * size), size)]
    batches = [b for b in batches if len(b) == size]
    query_ms, per_threads = {}, {}
    for _ in range(max(1, rounds)):
        for threads in sorted({1, os.cpu_count() or 1}):
            one = float(np.median([fastest_query_forward_ms(model_path, *encoded([q]), threads=threads, repeats=5)
                                   for q in queries[:60]]))
            query_ms[threads] = round(min(one, query_ms.get(threads, one)), 2)
            ms = float(np.median([fastest_query_forward_ms(model_path, *encoded(b), threads=threads, repeats=5)
                                  for b in batches]))
            per_threads[threads] = max(round(size * 1000 / ms, 1), per_threads.get(threads, 0.0))
    return {"runtime": "onnx" if model_path.suffix == ".onnx" else "torchscript",
            "query_ms": min(query_ms.values()), "query_ms_by_threads": query_ms, "batch": size,
            "queries_per_s_by_threads": per_threads, "queries_per_s": max(per_threads.values())}


def serve_pids(app_name: str) -> dict[str, int]:
    """Process ids of the Serve replica of the search API and of the Serve proxy, by their process titles
    (the benchmark runs alone on its machine, under the shared lock)."""
    found = {}
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if f"ServeReplica:{app_name}:SearchAPI" in args:
            found["replica"] = int(pid)
        elif "ProxyActor" in args:
            found["proxy"] = int(pid)
    return found


def flame_graphs(manifest: StackManifest, queries: list[str], folder: Path, app_name: str) -> None:
    """An 8-client level with py-spy sampling the replica and the proxy (--nonblocking: the processes are
    not paused to be read, so the load is served as it is without the profiler)."""
    py_spy = Path(sys.executable).parent / "py-spy"
    folder.mkdir(parents=True, exist_ok=True)
    recorders = [subprocess.Popen([str(py_spy), "record", "--pid", str(pid), "--format", "flamegraph", "--nonblocking",
                                   "--rate", "200", "-o", str(folder / f"flamegraph-search-{role}.svg")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for role, pid in serve_pids(app_name).items()]
    time.sleep(1)
    level = http_level(manifest, queries, 8, 60)
    for recorder in recorders:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
    print("profiled level:", json.dumps(level), "flame graphs in", folder)  # noqa: T201


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
