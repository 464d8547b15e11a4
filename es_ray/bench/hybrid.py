"""Hybrid search benchmark: dense, lexical and hybrid ranking quality and latency, one run, one collection.

    python -m es_ray.bench.hybrid --data ../shared/data/scifact

Starts a stack of its own (--state-dir, default /tmp/esr-bench-hybrid-<dataset>; stopped at the end) and
fills its blue collection with the whole corpus: the item vectors come from the corpus-vector cache
(es_ray/bench/corpus_vectors.py: the served model with the upsert job's chunking, embedded once per corpus
and reused by every benchmark) and are written with the store's own upsert, so the lexical index is the
one Postgres generates on every write. Every judged test query (--split) is then searched over HTTP in each mode
(search.* settings as configured: the defaults, chosen from the literature and never tuned on these
queries) at limit 100: nDCG@10 and Recall@100 by pytrec_eval. Latency: one client, the modes
interleaved query by query (so drift in the machine's load reaches all three alike), limit 10, no
session recorded (the session write costs every mode the same), after a warm-up; p50 per mode and
hybrid p50 / dense p50. Then the parts alone, from this process (parts_alone): embedding, the dense
statement at a page and at hybrid's depth, the lexical statement, the fusion.

The click-learned fusion (hybrid_learned), once per click seed (--click-seeds: the click model's seed
and the next two by default), on the same loaded collection: any promoted fusion forgotten (the default
serves again), the simulated users of configs/clicks.yaml (es_ray/demo/users.py; new people for each seed)
run `sessions_per_query` (5) hybrid sessions with clicks for every judged train query (never a test
query), with search's fusion exploration on as served (serve/fusion_exploration.py, search.fusion_explore_*),
the learner reads only that seed's sessions (es_ray/train/fusion_promotion.py: the fine-tune's debiasing,
split and gate), and every test query is searched in hybrid mode again, with the promoted fusion if the
gate passed one (else the default's), then, where one was promoted, with the default fusion again: each
seed's pair is measured in one state of the stack (the served ranking of a few test queries drifted
between the first measurement and the later ones with no fusion changed; drift_top10_changed counts, per
mode, the test queries whose top 10 differs between the first measurement and the end). hybrid_learned
and hybrid_default_same_state: the means over seeds; hybrid_learned_seeds: each seed's quality, decision
and fusion; learned_vs_default: the paired test over test queries of per-query nDCG@10 (learned minus
default, each averaged over seeds, es_ray/bench/quality_stats.paired); the targets compare the same. The
exploration's cost to the people who meet it (exploration_cost): on the train queries (their qrels),
the default fusion's nDCG@10 against each fusion exploration may serve instead, fused here from the two
lists as served; the cost per eligible search is the share times the mean loss of an explored page.
Results: bench/results/hybrid-<dataset>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import os
import time
from pathlib import Path

from psycopg import sql

from es_ray.bench.common import bench_stack, percentiles, write_result
from es_ray.bench.quality_stats import mean_of, paired
from es_ray.bench.corpus_vectors import collection_vectors
from es_ray.client import EsRayClient
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.demo.users import ClickModel, simulate_sessions
from es_ray.inference.encoder import resolve_model_dir
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.stack import control
from es_ray.store import blue_green, db, fusion_weights, search as store_search
from es_ray.store.collections import Collection, EmbeddedItem
from es_ray.store.fusion import Fusion, fuse
from es_ray.serve.fusion_exploration import alternatives
from es_ray.train.evaluation import evaluate, per_query
from es_ray.train.fusion_promotion import forget_promoted, learn_and_promote
from es_ray.train.fusion_weights import NotEnoughData

MODES = ("dense", "lexical", "hybrid")
WRITE_BATCH = 500


def load_corpus(settings, manifest, data: Path) -> int:
    """The blue collection holds exactly the corpus (loaded from cached vectors where it does not yet)."""
    m = settings.model
    corpus = {item["id"]: item for item in read_corpus(data / "corpus.jsonl")}
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        collection = Collection(blue.collection, blue.dim)
        stored = set(collection.get(conn, list(corpus)))
        extra = set(collection.sample_ids(conn, 10**9)) - set(corpus)
        if extra:
            collection.delete(conn, sorted(extra))
        missing = sorted(set(corpus) - stored)
        if missing:
            vectors = collection_vectors(data, resolve_model_dir(m.source), m.max_length, m.chunk_overlap, m.max_chunks)
            index = vectors.index()
            for start in range(0, len(missing), WRITE_BATCH):
                batch = []
                for object_id in missing[start:start + WRITE_BATCH]:
                    item, n = corpus[object_id], index[object_id]
                    text = item["text"]
                    batch.append(EmbeddedItem(object_id, item.get("payload") or {}, vectors.chunks[vectors.owner == n],
                                              {"text_sha256": hashlib.sha256(text.encode()).hexdigest()}, text))
                collection.upsert(conn, batch)
        fusion_weights.forget(conn, blue.collection)  # the default fusion first: an earlier run may have promoted one
        # The table as autovacuum leaves it after a load: the row estimate and the common words' shares
        # lexical search reads (ANALYZE), and the GIN index's pending list merged (VACUUM; a plain ANALYZE
        # leaves it, and until autovacuum merges it every lexical search scans it: about 200 ms a query
        # on SciFact just after a load, 12 after, EXPLAIN ANALYZE on this machine).
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(collection.items))
        return collection.count(conn)


def search(client: EsRayClient, query: str, mode: str, limit: int) -> tuple[list[str], float]:
    request = client.search_request(query, mode=mode, limit=limit, session=False)
    started = time.perf_counter()
    response = client.send("POST", "/v1/search", request)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return [r["id"] for r in response.json()["results"]], elapsed


def parts_alone(settings, manifest, texts: list[str]) -> dict:
    """Where hybrid's extra time can go, each part timed alone in this process (one client, the parts
    interleaved query by query, on a pooled connection set up as the replicas' are): the query's embedding
    through Triton, the dense statement at a page of 10 (dense mode) and at hybrid's depth, the lexical
    statement at hybrid's depth, and the fusion of the two lists in Python. What hybrid adds over dense
    beyond these is the route's own work: the second connection and the lexical list's transaction."""
    s = settings.search
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
    collection = Collection(blue.collection, blue.dim)
    encoder = TritonEncoder.of(manifest.triton_grpc_url, QUERY_ENCODER, blue, settings)  # as the replicas do
    fusion = Fusion.configured(s)
    ranking = store_search.Ranking("hybrid", fusion, s.depth, s.text_search_config, s.lexical_common_share,
                                   s.max_query_terms)
    timeout_ms = settings.postgres.search_timeout_ms  # each statement in a transaction with it, as served
    pool = db.open_pool(manifest.postgres_dsn, 1, settings.postgres.hnsw_ef_search)
    samples: dict[str, list[float]] = {k: [] for k in ("embed", "dense_10", "dense_depth", "lexical_depth", "fuse")}
    encoder.embed_queries(texts[:5])  # this process' first call opens the channel: not timed
    try:
        with pool.connection() as conn:
            for text in texts:
                started = time.perf_counter()
                vector = encoder.embed_queries([text])[0]
                samples["embed"].append(time.perf_counter() - started)
                started = time.perf_counter()
                store_search.search(conn, collection, vector, 10, timeout_ms=timeout_ms)
                samples["dense_10"].append(time.perf_counter() - started)
                started = time.perf_counter()
                dense = store_search.search(conn, collection, vector, s.depth, timeout_ms=timeout_ms)
                samples["dense_depth"].append(time.perf_counter() - started)
                started = time.perf_counter()
                words = store_search.hybrid_lexical(conn, collection, ranking, text, None, timeout_ms)
                samples["lexical_depth"].append(time.perf_counter() - started)
                started = time.perf_counter()
                fuse([(h.id, h.score) for h in dense], [(i, score) for i, score, _ in words], fusion)
                samples["fuse"].append(time.perf_counter() - started)
    finally:
        pool.close()
    return {k: percentiles(v) for k, v in samples.items()}


def served_fusion(client: EsRayClient, texts: list[str], settings, wanted: Fusion, other: Fusion,
                  timeout_s: float = 30) -> None:
    """Waits until the replicas rank hybrid searches with `wanted` instead of `other` (they re-read the
    promoted fusion when Postgres notifies them at commit): a probe query whose order the change changes,
    polled. Raises if they never do, rather than measuring one fusion under the other's name."""
    s = settings.search
    for text in texts[:50]:
        dense = [(i, 0.0) for i in search(client, text, "dense", s.depth)[0]]
        lexical = [(i, 0.0) for i in search(client, text, "lexical", s.depth)[0]]
        expected = [f.id for f in fuse(dense, lexical, wanted)][:20]
        if expected != [f.id for f in fuse(dense, lexical, other)][:20]:
            break
    else:
        return  # no probe tells the two apart: the measurement is the same under either
    deadline = time.monotonic() + timeout_s
    while search(client, text, "hybrid", 20)[0] != expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replicas did not serve {wanted.label()} within {timeout_s:g} s")
        time.sleep(0.2)


def train_queries(data: Path, queries: dict[str, str], qrels) -> tuple[dict[str, str], dict]:
    """The judged train queries (never a test query) and their qrels."""
    train_qrels = read_qrels(data / "qrels" / "train.tsv")
    train = {q: queries[q] for q, docs in train_qrels.items()
             if q in queries and q not in qrels and any(g > 0 for g in docs.values())}
    return train, train_qrels


def exploration_cost(client: EsRayClient, settings, train: dict[str, str], train_qrels) -> dict:
    """What exploration costs the people who meet it, on the train queries (never the test queries):
    nDCG@10 of the default fusion and of each fusion exploration may serve instead, fused here from the
    two lists as search fuses them (the exploration draws uniformly among them)."""
    s = settings.search
    default = Fusion.configured(settings.search)
    choices = alternatives(default, s.learned_lexical_weights, s.learned_rrf_ks, s.fusion_explore_over)
    runs: dict[str, dict[str, dict[str, float]]] = {f.label(): {} for f in [default, *choices]}
    for q, text in train.items():
        dense = [(i, 0.0) for i in search(client, text, "dense", s.depth)[0]]
        lexical = [(i, 0.0) for i in search(client, text, "lexical", s.depth)[0]]
        for fusion in [default, *choices]:
            fused = fuse(dense, lexical, fusion)[:100]
            runs[fusion.label()][q] = {f.id: float(100 - k) for k, f in enumerate(fused)}
    ndcg = {label: round(evaluate(run, train_qrels)["ndcg@10"], 4) for label, run in runs.items()}
    loss = sum(ndcg[default.label()] - ndcg[f.label()] for f in choices) / len(choices) if choices else 0.0
    return {"train_queries": len(train), "share": s.fusion_explore_share, "over": s.fusion_explore_over,
            "ndcg@10": ndcg, "explored_page_loss": round(loss, 4),
            "cost_per_search": round(s.fusion_explore_share * loss, 4),
            "note": "cost_per_search: over anonymous, unfiltered hybrid searches that record a session"}


def test_run(client: EsRayClient, queries: dict[str, str], judged: list[str], mode: str = "hybrid") -> dict:
    """Every test query searched in `mode` at limit 100, without a session: a run scored by position."""
    run = {}
    for q in judged:
        found, _ = search(client, queries[q], mode, 100)
        run[q] = {object_id: float(100 - k) for k, object_id in enumerate(found)}
    return run


def learn_fusion(settings, manifest, train: dict[str, str], train_qrels, queries: dict[str, str], qrels,
                 judged: list[str], args, seed: int, first_person: int) -> dict:
    """For one click seed: the default fusion back, simulated hybrid sessions on the train queries, the
    learner on those sessions alone, then hybrid on the test queries again with what it promoted and,
    where that is another fusion, with the default again: the pair is measured in one state of the stack
    (the served hybrid ranking drifted on a few queries between the first measurement and this one with
    no fusion changed, on Cranfield; `drift` in the result)."""
    default = Fusion.configured(settings.search)
    texts = [queries[q] for q in judged]
    model = dataclasses.replace(ClickModel.load(), sessions_per_query=args.sessions_per_query, seed=seed)
    since = datetime.datetime.now(datetime.timezone.utc)
    started = time.perf_counter()
    sessions, clicks = simulate_sessions(manifest.serve_url, train, train_qrels, model, args.clients, mode="hybrid",
                                         first_person=first_person)
    out = {"click_seed": seed, "sessions": sessions, "clicks": clicks,
           "simulate_s": round(time.perf_counter() - started, 1), "promoted": False, "fusion": dataclasses.asdict(default)}
    try:
        outcome = learn_and_promote(settings, manifest.postgres_dsn, since=since)
        out.update({k: outcome[k] for k in ("promoted", "fusion", "chosen", "train_scores", "heldout", "decision",
                                            "details", "mlflow_run_id")})
    except NotEnoughData as err:   # nothing learned: the default fusion serves, and is measured as the learned one
        out["not_learned"] = str(err)
    with EsRayClient.for_stack(manifest, timeout=60) as client:
        if out["promoted"]:
            promoted = Fusion(**out["fusion"])
            served_fusion(client, texts, settings, promoted, default)
            run = test_run(client, queries, judged)
            # Back to the default (the next seed starts from it), measured again in this state.
            forget_promoted(settings, manifest.postgres_dsn)
            served_fusion(client, texts, settings, default, promoted)
            default_run = test_run(client, queries, judged)
        else:
            run = default_run = test_run(client, queries, judged)   # the default fusion ranked it
    quality, default_quality = evaluate(run, qrels), evaluate(default_run, qrels)
    out["quality"] = {"ndcg@10": round(quality["ndcg@10"], 4), "recall@100": round(quality["recall@100"], 4)}
    out["default_quality"] = {"ndcg@10": round(default_quality["ndcg@10"], 4),
                              "recall@100": round(default_quality["recall@100"], 4)}
    return {**out, "per_query": per_query(run, qrels), "default_per_query": per_query(default_run, qrels),
            "run": run, "default_run": default_run}


def top10(run: dict) -> dict[str, list[str]]:
    return {q: sorted(r, key=lambda i: -r[i])[:10] for q, r in run.items()}


def learned_over_seeds(seeds: list[dict]) -> dict:
    """hybrid_learned and hybrid_default_same_state (means over seeds), hybrid_learned_seeds and
    learned_vs_default (paired, learned - default, each seed's pair measured in one state, per-query
    nDCG@10 averaged over seeds first)."""
    rows = []
    for s in seeds:
        run, default_top10 = top10(s.pop("run")), top10(s.pop("default_run"))
        s["test_queries_reranked"] = sum(run[q] != default_top10[q] for q in default_top10)   # top 10 moved
        s["gain_ndcg@10"] = round(s["quality"]["ndcg@10"] - s["default_quality"]["ndcg@10"], 4)
        rows.append(s)
    comparison = paired([s.pop("default_per_query") for s in rows], [s.pop("per_query") for s in rows])
    return {"hybrid_learned": mean_of([s["quality"] for s in rows]),
            "hybrid_default_same_state": mean_of([s["default_quality"] for s in rows]), "hybrid_learned_seeds": rows,
            "learned_vs_default": {"pairs": "learned - default per test query, nDCG@10, each averaged over click "
                                            "seeds; each seed's two measured in one state of the stack",
                                   "seeds": [s["click_seed"] for s in rows], **comparison}}


def drift(client: EsRayClient, queries: dict[str, str], judged: list[str], runs: dict, late_hybrid: dict) -> dict:
    """Test queries whose top 10 differs between the first measurement and the end (default fusion, no
    session either time), per mode: what changed in the served lists while only the fusion should have."""
    late = {"dense": test_run(client, queries, judged, "dense"), "lexical": test_run(client, queries, judged, "lexical"),
            "hybrid": late_hybrid}
    early = {mode: top10(runs[mode]) for mode in MODES}
    return {mode: sum(early[mode][q] != top10(late[mode])[q] for q in judged) for mode in MODES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="BEIR directory (corpus, queries, qrels/test.tsv)")
    parser.add_argument("--state-dir", type=Path, default=None, help="default /tmp/esr-bench-hybrid-<dataset>")
    parser.add_argument("--warmup", type=int, default=20, help="untimed searches per mode first")
    parser.add_argument("--keep", action="store_true", help="leave the stack running afterwards")
    parser.add_argument("--split", default="test", help="qrels split; another than test (train: where settings "
                        "are chosen) writes /tmp/esr-bench-scratch/hybrid-<dataset>-<split>.json, not the report")
    parser.add_argument("--sessions-per-query", type=int, default=ClickModel.load().sessions_per_query,
                        help="simulated hybrid sessions per train query for the learned fusion")
    parser.add_argument("--clients", type=int, default=3, help="concurrent simulated users")
    seed = ClickModel.load().seed
    parser.add_argument("--click-seeds", type=int, nargs="+", default=[seed, seed + 1, seed + 2],
                        help="click model seeds: one simulation, learning and measurement of the learned fusion each")
    args, defaults = parser.parse_args(argv), parser.parse_args(["--data", "."])
    data = args.data.resolve()
    # The simulated clicks must not also move items' vectors (the improvement loop's click memories)
    # between the default and the learned hybrid measurements: only the fusion may differ.
    os.environ.setdefault("ES_RAY_IMPROVE__ENABLED", "false")
    settings, manifest = bench_stack(args.state_dir or Path(f"/tmp/esr-bench-hybrid-{data.name}"))
    try:
        docs = load_corpus(settings, manifest, data)
        queries, qrels = read_queries(data / "queries.jsonl"), read_qrels(data / "qrels" / f"{args.split}.tsv")
        judged = sorted(q for q, docs_ in qrels.items() if q in queries and any(g > 0 for g in docs_.values()))
        runs: dict[str, dict[str, dict[str, float]]] = {mode: {} for mode in MODES}
        latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
        with EsRayClient.for_stack(manifest, timeout=60) as client:
            for mode in MODES:
                for q in judged[:args.warmup]:
                    search(client, queries[q], mode, 10)
            for q in judged:   # quality: the ranking's first 100, scored by position (ties cannot reorder it)
                for mode in MODES:
                    found, _ = search(client, queries[q], mode, 100)
                    runs[mode][q] = {object_id: float(100 - k) for k, object_id in enumerate(found)}
            for q in judged:   # latency: a page of 10, the modes interleaved
                for mode in MODES:
                    latencies[mode].append(search(client, queries[q], mode, 10)[1])
        parts = parts_alone(settings, manifest, [queries[q] for q in judged])
        train, train_qrels = train_queries(data, queries, qrels)
        with EsRayClient.for_stack(manifest, timeout=60) as client:
            cost = exploration_cost(client, settings, train, train_qrels)
        people = len(train) * args.sessions_per_query
        seeds = [learn_fusion(settings, manifest, train, train_qrels, queries, qrels, judged, args, seed, n * people)
                 for n, seed in enumerate(args.click_seeds)]
        with EsRayClient.for_stack(manifest, timeout=60) as client:
            drifted = drift(client, queries, judged, runs, seeds[-1]["default_run"])
        learned = learned_over_seeds(seeds)
        quality = {mode: evaluate(runs[mode], qrels) for mode in MODES}
        p50 = {mode: percentiles(latencies[mode])["p50_ms"] for mode in MODES}
        s = settings.search
        result = {
            "benchmark": "hybrid", "docs": docs, "queries": len(judged),
            **{mode: {"ndcg@10": round(quality[mode]["ndcg@10"], 4), "recall@100": round(quality[mode]["recall@100"], 4)}
               for mode in MODES},
            **learned, "drift_top10_changed": drifted, "train_queries": len(train), "exploration_cost": cost,
            "p50_ms": p50, "latency": {mode: percentiles(latencies[mode]) for mode in MODES},
            "hybrid_to_dense_p50": round(p50["hybrid"] / p50["dense"], 3),
            "parts_p50_ms": {k: v["p50_ms"] for k, v in parts.items()}, "parts": parts,
            "settings": {"fusion": s.fusion, "rrf_k": s.rrf_k, "dense_weight": s.dense_weight,
                         "lexical_weight": s.lexical_weight, "depth": s.depth,
                         "text_search_config": s.text_search_config, "learned_lexical_weights":
                         s.learned_lexical_weights, "learned_rrf_ks": s.learned_rrf_ks,
                         "fusion_explore_share": s.fusion_explore_share, "fusion_explore_over": s.fusion_explore_over},
        }
        best = max(result["dense"]["ndcg@10"], result["lexical"]["ndcg@10"])
        result["targets"] = {"hybrid_ndcg_at_least_best": result["hybrid"]["ndcg@10"] >= best,
                             "hybrid_p50_at_most_1.2x_dense": result["hybrid_to_dense_p50"] <= 1.2}
        # The learned fusion against the default measured in the same state (learn_fusion's docstring).
        gains = [seed["gain_ndcg@10"] for seed in result["hybrid_learned_seeds"]]
        result["targets"]["learned_ndcg_at_least_default"] = \
            result["hybrid_learned"]["ndcg@10"] >= result["hybrid_default_same_state"]["ndcg@10"]
        result["targets"]["learned_ndcg_never_0.005_below_default"] = min(gains) >= -0.005   # on any seed
        command = f"python -m es_ray.bench.hybrid --data {args.data}" + "".join(
            f" --{flag} {value}" for flag, value, default in (
                ("split", args.split, "test"), ("sessions-per-query", args.sessions_per_query, defaults.sessions_per_query),
                ("clients", args.clients, defaults.clients),
                ("click-seeds", " ".join(map(str, args.click_seeds)), " ".join(map(str, defaults.click_seeds))))
            if value != default)   # the flags that differ from the defaults: the command reproduces the run
        path = write_result("hybrid", data.name, {**result, "split": args.split}, command,
                            scratch="" if args.split == "test" else args.split)
        print(path.read_text())
    finally:
        if not args.keep:
            control.down(settings)


if __name__ == "__main__":
    main()
