"""Renders bench/results/*.json as the tables in BENCHMARKS.md: one table per benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

Column = tuple[str, Callable[[dict[str, Any]], Any]]


def _learned_fusion(r: dict) -> str:
    """The learned fusion's nDCG@10: the mean over click seeds, each seed's (with the fusion the gate
    promoted, if any) and the paired difference from the default fusion."""
    seeds = r.get("hybrid_learned_seeds")
    if seeds is None:   # a result from before the multi-seed measurement: one learning
        learned = r.get("learned_fusion") or {}
        if not r.get("hybrid_learned"):
            return "not learned" if learned.get("not_learned") else "not built"
        f = learned.get("fusion", {})
        kept = f"promoted: k {f.get('k'):g}, lexical weight {f.get('lexical_weight'):g}" if learned.get("promoted") \
            else "gate kept the default"
        return f"{r['hybrid_learned']['ndcg@10']} ({kept})"

    def seed(s: dict) -> str:
        f = s["fusion"]
        return f"{s['quality']['ndcg@10']}" + (f" promoted k {f['k']:g} lexical {f['lexical_weight']:g}"
                                               if s["promoted"] else " default kept")
    d = r["learned_vs_default"]
    same = r.get("hybrid_default_same_state", {}).get("ndcg@10", "-")
    return (f"{r['hybrid_learned']['ndcg@10']} (default in the same state {same}; seeds: "
            f"{'; '.join(seed(s) for s in seeds)}; learned - default {d['mean_difference']:+.4f}, "
            f"95% {d['bootstrap_95']}, p {d['p_randomisation']})")


def _exploration_cost(r: dict) -> str:
    c = r.get("exploration_cost")
    if not c:
        return "-"
    return f"{c['share']} x {c['explored_page_loss']} = {c['cost_per_search']}"


def _machine(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    return f"{m.get('cores')} cores, {m.get('ram_gib')} GiB"


def _search_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**r, **level, "embed": r["parts_p50_ms"]["embed"], "pgvector": r["parts_p50_ms"]["pgvector"]}
            for level in r["levels"]]


TABLES: list[tuple[str, str, Callable[[dict], list[dict]], list[Column]]] = [
    ("search", "Search latency (HTTP end to end vs its parts, same run)", _search_rows, [
        ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]), ("clients", lambda r: r["clients"]),
        ("p50 ms", lambda r: r["p50_ms"]), ("p99 ms", lambda r: r["p99_ms"]), ("req/s", lambda r: r.get("requests_per_s", "-")),
        ("embed p50 ms", lambda r: r["embed"]), ("pgvector p50 ms", lambda r: r["pgvector"]),
        ("ratio (target <= 1.3)", lambda r: r["ratio"])]),
    ("search", "Search against the model's own speed (same run; issue 17's targets)",
     lambda r: [r] if "overhead_ms" in r else [], [
        ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]),
        ("overhead ms at 1 client (target <= 5)", lambda r: r["overhead_ms"]),
        ("the same through Serve's proxy", lambda r: (r.get("via_proxy") or {}).get("overhead_ms", "-")),
        ("embed / fastest forward (target <= 1.5)", lambda r: r["embed_to_fastest"]),
        ("fastest forward ms (1 query)", lambda r: r["fastest_forward"]["query_ms"]),
        ("req/s at 8 clients", lambda r: r["throughput_8"]),
        ("Triton batch", lambda r: r["levels"][1]["triton_batch"]),
        ("fastest queries/s at that batch", lambda r: r["fastest_throughput"]),
        ("throughput ratio (target >= 0.6)", lambda r: r["throughput_ratio"]),
        ("p99 / p50 at 8 clients (target <= 3)", lambda r: r["p99_to_p50_8"])]),
    ("ingest", "Ingest throughput (upsert job vs the raw forward pass, same run)", lambda r: [r], [
        ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]), ("chunks", lambda r: r["chunks"]),
        ("batch", lambda r: r["batch_size"]), ("rows a request", lambda r: r.get("rows_per_request", 64)),
        ("max_length", lambda r: r["max_length"]),
        ("job docs/s", lambda r: r["docs_per_s"]), ("raw docs/s", lambda r: r["raw_docs_per_s"]),
        ("raw runtime", lambda r: r.get("raw_runtime", "eager torch")),
        ("ratio (target >= 0.8)", lambda r: r["ratio"]), ("job wall s", lambda r: r["job_wall_s"])]),
    ("recall", "HNSW recall@10 against exact search (same stored vectors)", lambda r: [r], [
        ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]), ("chunk vectors", lambda r: r["vectors"]),
        ("queries", lambda r: r["queries"]), ("ef_search", lambda r: r["ef_search"]),
        ("recall@10 (target >= 0.98)", lambda r: r["recall_at_10"])]),
]
TABLES.append(("clicks", "Click ingestion (HTTP, every batch sent twice)", lambda r: [r], [
    ("sessions", lambda r: r["sessions"]), ("events", lambda r: r["events"]), ("events/request", lambda r: r["batch"]),
    ("clients", lambda r: r["clients"]), ("accepted events/s (target >= 500)", lambda r: r["events_per_s"]),
    ("accepted", lambda r: r["first"]["accepted"]), ("resent: duplicates", lambda r: r["resend"]["duplicates"]),
    ("one event per request: events/s", lambda r: (r.get("one_per_request") or {}).get("events_per_s", "-"))]))
TABLES.append(("improve", "Improvement from simulated clicks (nDCG@10; test queries never clicked)", lambda r: [r], [
    ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]), ("sessions", lambda r: r["sessions"]),
    ("clicks", lambda r: r["clicks"]), ("train before", lambda r: r["train"]["before"]["ndcg@10"]),
    ("train after (target +0.10)", lambda r: r["train"]["after"]["ndcg@10"]),
    ("test before", lambda r: r["test"]["before"]["ndcg@10"]),
    ("test after (target >= -0.005)", lambda r: r["test"]["after"]["ndcg@10"]),
    ("improve s", lambda r: r["improve_s"])]))
def _finetune_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{**r, "method": "baseline (blue v1)", "scores": r["baseline"], "run": {}}]
    for method in ("naive", "debiased"):
        run = r.get(f"{method}_run", {})
        rows.append({**r, "method": method, "scores": r[method], "run": {
            **run, "overhead": round(run["tune_wall_s"] / run["ideal_wall_s"], 3) if run else "",
            "gate": ("candidate" if run.get("candidate") else "refused") if run else ""}})
    return rows


TABLES.append(("finetune", "Fine-tuning from simulated clicks (test queries never clicked; exact ranking)",
               _finetune_rows, [
    ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]), ("sessions", lambda r: r["sessions"]),
    ("model", lambda r: r["method"]), ("test nDCG@10 (target >= 0.71)", lambda r: r["scores"]["ndcg@10"]),
    ("MRR@10", lambda r: r["scores"]["mrr@10"]), ("Recall@100", lambda r: r["scores"]["recall@100"]),
    ("gate on held-out clicks", lambda r: r["run"].get("gate", "")),
    ("trials", lambda r: len(r["run"].get("trials", [])) or ""), ("Tune wall s", lambda r: r["run"].get("tune_wall_s", "")),
    ("ideal s", lambda r: r["run"].get("ideal_wall_s", "")),
    ("wall / ideal (target <= 1.2)", lambda r: r["run"].get("overhead", ""))]))
TABLES.append(("reindex", "Reindex to a new model (Ray Data job via Triton into a green collection, then switch)",
               lambda r: [{**r, **run} for run in r["runs"]], [
    ("items", lambda r: r["items"]), ("HNSW", lambda r: r["hnsw"]), ("items/s", lambda r: r["items_per_s"]),
    ("raw forward items/s", lambda r: r["raw_items_per_s"]),
    ("raw runtime", lambda r: r.get("raw_runtime", "eager torch")), ("ratio (target >= 0.8)", lambda r: r["ratio_to_raw"]),
    ("first range s", lambda r: r.get("first_range_s") or ""),
    ("index build s", lambda r: r["index_s"]), ("reindex s", lambda r: r["reindex_s"]),
    ("ms per 1k items (linear: flat)", lambda r: r["ms_per_1k_items"]),
    ("search p50 / p99 ms idle", lambda r: f"{r['search_idle']['p50_ms']} / {r['search_idle']['p99_ms']}"),
    ("during reindex", lambda r: f"{r['search_during']['p50_ms']} / {r['search_during']['p99_ms']}"),
    ("failed searches", lambda r: r["search_failures"])]))
def _load_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    if "memory_mb" in r:   # own memory (private, outside shared mappings) since s26; older results: RSS only
        memory, start, end = r["growth_measure"], r["memory_mb"]["total_start"], r["memory_mb"]["total_end"]
        size = f"own {start['own']} -> {end['own']}; RSS {start['rss']} -> {end['rss']}"
    else:
        memory, size = "RSS", f"RSS {r['rss_mb']['total_start']} -> {r['rss_mb']['total_end']}"
    rows = [{**r, "phase": f"steady {r['seconds']:g} s", "window": r["steady"], "recovered": "", "rss": size,
             "growth": f"{r['max_growth_after_warmup_pct']} % by {memory} ({r['max_growth_process']}, after "
                       f"{r['warmup_s']} s)" if r.get("max_growth_process") else "-"}]
    for name, fault in r["faults"].items():
        recovered = next((v for k, v in fault.items() if k.startswith("recovered_s")), "")
        rows.append({**r, "phase": name.replace("_", " "), "window": fault["during"], "recovered": recovered, "rss": "",
                     "growth": ""})
    return rows


TABLES.append(("load", "Load and faults (loopback; clicks lost must be 0)", _load_rows, [
    ("phase", lambda r: r["phase"]), ("search clients", lambda r: r["search_clients"]),
    ("searches", lambda r: r["window"]["search"]["requests"]), ("failed", lambda r: r["window"]["search"]["failed"]),
    ("statuses", lambda r: " ".join(f"{k}:{v}" for k, v in sorted(r["window"]["search"]["statuses"].items()))),
    ("p50 / p99 ms", lambda r: f"{r['window']['search']['latency'].get('p50_ms', '-')} / "
                               f"{r['window']['search']['latency'].get('p99_ms', '-')}"),
    ("refused p99 ms", lambda r: r["window"]["search"].get("refused_latency", {}).get("p99_ms", "-")),
    ("click requests (failed)", lambda r: f"{r['window']['click']['requests']} ({r['window']['click']['failed']})"),
    ("upserts (failed)", lambda r: f"{r['window']['upsert']['requests']} ({r['window']['upsert']['failed']})"),
    ("recovered s", lambda r: r["recovered"]), ("stack MB start -> end", lambda r: r["rss"]),
    ("largest process growth after warm-up (target <= 5 %)", lambda r: r["growth"]),
    ("clicks acked / lost", lambda r: f"{r['clicks']['acknowledged']} / {r['clicks']['lost']}")]))
TABLES.append(("load-attack", "An attacker beside normal traffic (loopback; top-10 changed must be 0)",
               lambda r: [r], [
    ("attacker req/s (sent)", lambda r: f"{r['attack_rate']:g} ({r['attack_rate_sent']})"),
    ("seconds", lambda r: r["attack_seconds"]),
    ("attacker answered", lambda r: " ".join(f"{k}:{v}" for k, v in r["attack_statuses"].items())),
    ("normal searches alone / beside it", lambda r: f"{r['normal_without']['requests']} / {r['normal_with']['requests']}"),
    ("normal errors under attack", lambda r: r["normal_errors_under_attack"]),
    ("normal p99 ms without / with", lambda r: f"{r['p99_ms_without']} / {r['p99_ms_with']}"),
    ("top-10 changed (of queries)", lambda r: f"{r['top10_changed']} ({r['queries_compared']})")]))
TABLES.append(("load-deploy", "New model versions deployed and undeployed under load (loopback; failures must be 0)",
               lambda r: [r], [
    ("cycles (failed)", lambda r: f"{r['deploy_cycles']} ({len(r['deploy_cycles_failed'])})"),
    ("search clients", lambda r: r["search_clients"]), ("seconds", lambda r: r["seconds"]),
    ("searches (failed)", lambda r: f"{r['search']['requests']} ({r['deploy_failed_searches']})"),
    ("upserts (failed)", lambda r: f"{r['upsert']['requests']} ({r['deploy_failed_upserts']})"),
    ("search p50 / p99 ms", lambda r: f"{r['search']['latency'].get('p50_ms', '-')} / "
                                      f"{r['search']['latency'].get('p99_ms', '-')}"),
    ("deploy s p50 (max)", lambda r: f"{r['deploy_s'].get('p50', '-')} ({r['deploy_s'].get('max', '-')})"),
    ("tritonserver aborts", lambda r: r["triton_aborts"]),
    ("lock_exception lines", lambda r: r["triton_lock_exceptions"])]))
TABLES.append(("priority", "Search while a fine-tune runs (loopback): Ray's default worker niceness (15 for all), "
                            "everything at 0, serving first (batch work at ray.batch_nice)",
               lambda r: [{**r, "name": n, "s": r[n]} for n in ("ray_default", "all_at_0", "serving_first")], [
    ("setting", lambda r: r["name"]), ("Ray workers nice", lambda r: r["s"]["ray_worker_niceness"]),
    ("batch nice", lambda r: r["s"]["batch_nice"]), ("search clients", lambda r: r["search_clients"]),
    ("p50 / p99 ms alone", lambda r: f"{r['s']['baseline']['p50_ms']} / {r['s']['baseline']['p99_ms']}"),
    ("p50 / p99 ms beside a fine-tune", lambda r: f"{r['s']['p50_ms']} / {r['s']['p99_ms']}"),
    ("p99 beside / alone", lambda r: r["s"]["p99_to_alone"]),
    ("fine-tune s", lambda r: " ".join(str(x["seconds"]) for x in r["s"]["runs"])),
    ("nice seen: train worker, replica, proxy", lambda r: " ".join(
        f"{x['nice_seen']['train_worker']} {x['nice_seen']['replica']} {x['nice_seen']['proxy']}" for x in r["s"]["runs"]))]))
TABLES.append(("guards", "What the learning guards cost honest users (test queries, blue model + click memories, "
                          "means over click seeds)", lambda r: [{**r, **row} for row in r["rows"]], [
    ("dataset", lambda r: r["dataset"]), ("sessions per train query", lambda r: r["sessions_per_query"]),
    ("baseline nDCG@10", lambda r: r["baseline"]["ndcg@10"]),
    ("no guards", lambda r: r["unguarded"]["ndcg@10"]), ("guards", lambda r: r["guarded"]["ndcg@10"]),
    ("guards - none (95% CI)", lambda r: f"{r['paired']['mean_difference']:+.4f} {r['paired']['bootstrap_95']}"),
    ("p", lambda r: r["paired"]["p_randomisation"]),
    ("min_clients", lambda r: r["guards"]["min_clients"]), ("click seeds", lambda r: r["click_seeds"])]))
def _quality_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Baseline, then per noise level: memories alone, naive, debiased (tower and whole system), skylines."""
    def row(label, noise, tower, system=None, p=""):
        return {**r, "label": label, "noise": noise, "tower": tower, "system": system or {}, "p": p}

    rows = [row("baseline (no clicks)", "", r["baseline"])]
    for noise, entry in r["by_noise"].items():
        rows.append(row("click memories alone", noise, {}, entry["memories_only"]))
        for method in ("naive", "debiased"):
            if method in entry:
                rows.append(row(method, noise, entry[method]["tower"], entry[method]["system"],
                                _paired(entry) if method == "debiased" else ""))
    for name, scores in r.get("skylines", {}).items():
        rows.append(row(f"skyline: {name.replace('_', ' ')}", "", scores))
    return rows


def _paired(entry: dict[str, Any]) -> str:
    """Debiased minus naive: mean difference and randomisation p, tower then system."""
    parts = [f"{entry[k]['mean_difference']:+.4f} (p {entry[k]['p_randomisation']})"
             for k in ("paired_tower", "paired_system") if k in entry]
    return " / ".join(parts) or str(entry.get("paired_p", ""))


def _get(scores: dict[str, Any], key: str) -> Any:
    return scores.get(key, "")


TABLES.append(("quality", "Learning from clicks, offline harness (test queries never clicked, whole collection, "
               "means over click seeds)", _quality_rows, [
    ("dataset", lambda r: r["dataset"]), ("noise", lambda r: r["noise"]), ("method", lambda r: r["label"]),
    ("tower nDCG@10", lambda r: _get(r["tower"], "ndcg@10")),
    ("system nDCG@10", lambda r: _get(r["system"], "ndcg@10")),
    ("system: shared / new", lambda r: f"{_get(r['system'], 'shared_ndcg@10')} / {_get(r['system'], 'new_ndcg@10')}"
     if r["system"] else ""),
    ("tower MRR@10", lambda r: _get(r["tower"], "mrr@10")), ("tower R@100", lambda r: _get(r["tower"], "recall@100")),
    ("val nDCG@10", lambda r: _get(r["tower"], "val_ndcg@10")),
    ("train nDCG@10 (system)", lambda r: _get(r["system"] or r["tower"], "train_ndcg@10")),
    ("debiased - naive: tower / system", lambda r: r["p"]),
    ("seeds clicks x train", lambda r: f"{r['seeds']['clicks']} x {r['seeds']['train']}")]))
TABLES.append(("runtimes", "Model runtimes (same SciFact inputs, one run, medians over interleaved rounds; torch = eager fp32)",
               lambda r: [{**r, **row} for row in r["runtimes"]], [
    ("runtime", lambda r: r["runtime"]), ("threads", lambda r: r["threads"]), ("docs", lambda r: r["docs"]),
    ("ingest docs/s", lambda r: r["ingest_docs_per_s"]), ("reindex docs/s", lambda r: r["reindex_docs_per_s"]),
    ("query p50 ms", lambda r: r["query_p50_ms"]),
    ("x TorchScript: ingest / reindex / query", lambda r: f"{r['ingest_vs_torchscript']} / {r['reindex_vs_torchscript']}"
                                                          f" / {r['query_vs_torchscript']}"),
    ("min cosine to torch: docs / queries", lambda r: f"{r['cosine_docs_min']} / {r['cosine_queries_min']}"),
    ("test nDCG@10", lambda r: r.get("test_ndcg@10", "-"))]))
TABLES.append(("gpu", "Embedding on a GPU (CUDA torch, fp32; es-ray's encoding stage against the raw forward pass there, "
                      "best of interleaved rounds)", lambda r: [r], [
    ("gpu", lambda r: r["gpu"]), ("torch", lambda r: r["torch"]), ("docs", lambda r: r["docs"]),
    ("chunks", lambda r: r["chunks"]), ("batch x rows", lambda r: f"{r['batch_size']} x {r['rows_per_request']}"),
    ("ingest docs/s (workers)", lambda r: f"{r['ingest_docs_per_s']} ({r['workers']}); 1: {r['ingest_one_worker_docs_per_s']}"),
    ("raw docs/s", lambda r: r["raw_docs_per_s"]), ("ingest / raw", lambda r: r["ingest_ratio"]),
    ("tokenise docs/s", lambda r: r["tokenise_docs_per_s"]),
    ("query p50 ms: path / raw", lambda r: f"{r['query_p50_ms']} / {r['raw_query_p50_ms']}"),
    ("query path / raw", lambda r: r["query_ratio"])]))
TABLES.append(("idle", "Idle stack (every process of the state dir's stack, sampled over the window)", lambda r: [r], [
    ("stack", lambda r: r["stack"]), ("window s", lambda r: r["seconds"]), ("processes", lambda r: r["processes"]),
    ("cores busy (target <= 0.10)", lambda r: r["core_fraction"]),
    ("memory GiB PSS (target <= 3)", lambda r: r["memory_gib"]), ("RSS GiB", lambda r: r["rss_gib"]),
    ("top CPU", lambda r: ", ".join(f"{p['name']} {p['core_fraction']}" for p in r["top_cpu"][:3])),
    ("left after down", lambda r: len(r["after_down"]["processes"]) if "after_down" in r else "-")]))
TABLES.append(("growth", "Search as the collection grows (SciFact item vectors plus noise, one per item; pgvector HNSW)",
               lambda r: [{**r, **size} for size in r["sizes"]], [
    ("vectors", lambda r: r["vectors"]), ("HNSW build s", lambda r: r["hnsw_build_s"]),
    ("ef_search", lambda r: r["ef_search"]),
    ("p50 / p99 ms", lambda r: f"{r['unfiltered']['p50_ms']} / {r['unfiltered']['p99_ms']}"),
    ("recall@10 (target >= 0.95)", lambda r: r["unfiltered"]["recall_at_10"]),
    ("filtered 10 %: p50 ms / recall@10", lambda r: f"{r['filtered']['p50_ms']} / {r['filtered']['recall_at_10']}"),
    ("other ef_search: p50 ms / recall@10 / filtered recall@10", lambda r: "; ".join(
        f"{ef}: {m['unfiltered']['p50_ms']} / {m['unfiltered']['recall_at_10']} / {m['filtered']['recall_at_10']}"
        for ef, m in r.get("other_ef_search", {}).items()) or "-"),
    ("p50 largest / smallest (target <= 1.5)", lambda r: r["p50_largest_to_smallest"])]))
TABLES.append(("hybrid", "Search modes (test queries, whole collection, HTTP; search.* defaults; same run)", lambda r: [r], [
    ("dataset", lambda r: r["dataset"]), ("docs", lambda r: r["docs"]), ("queries", lambda r: r["queries"]),
    ("nDCG@10 dense / lexical / hybrid (target: hybrid >= the better)",
     lambda r: f"{r['dense']['ndcg@10']} / {r['lexical']['ndcg@10']} / {r['hybrid']['ndcg@10']}"),
    ("Recall@100 dense / lexical / hybrid",
     lambda r: f"{r['dense']['recall@100']} / {r['lexical']['recall@100']} / {r['hybrid']['recall@100']}"),
    ("click-learned fusion nDCG@10, mean over click seeds (targets: >= the default; no seed 0.005 below it)",
     _learned_fusion),
    ("fusion exploration's cost, train queries: share x nDCG@10 lost by an explored page = per search",
     _exploration_cost),
    ("p50 ms dense / lexical / hybrid (1 client)",
     lambda r: f"{r['p50_ms']['dense']} / {r['p50_ms']['lexical']} / {r['p50_ms']['hybrid']}"),
    ("hybrid / dense p50 (target <= 1.2)", lambda r: r["hybrid_to_dense_p50"]),
    ("parts alone, p50 ms: embed / dense at 10 / dense at depth / lexical at depth / fusion", lambda r: " / ".join(
        str(r["parts_p50_ms"][k]) for k in ("embed", "dense_10", "dense_depth", "lexical_depth", "fuse"))
     if "parts_p50_ms" in r else "-")]))
COMMON: list[Column] = [("commit", lambda r: r["commit"]), ("date", lambda r: r["date"][:10]), ("machine", _machine)]


def render(paths: list[Path]) -> str:
    results = [json.loads(p.read_text()) for p in paths]
    lines: list[str] = []
    for name, title, rows_of, columns in TABLES:
        rows = [row for r in results if r.get("benchmark") == name for row in rows_of(r)]
        if not rows:
            continue
        columns = columns + COMMON
        lines += [f"### {title}", "", "| " + " | ".join(h for h, _ in columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(get(row)) for _, get in columns) + " |" for row in rows]
        lines.append("")
    commands = sorted({r["command"] for r in results if r.get("command")})
    if commands:
        lines.append("Commands: " + "; ".join(f"`{c}`" for c in commands))
    return "\n".join(lines)
