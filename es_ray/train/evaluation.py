"""Retrieval quality with trec_eval's own implementation (pytrec_eval), never a hand-rolled nDCG.

`evaluate(run, qrels)` takes {query id: {doc id: score}} and {query id: {doc id: grade}} and returns
the mean over queries that have judgements: nDCG@10, MRR@10, Recall@10 and Recall@100.
"""

from __future__ import annotations

import pytrec_eval

MEASURES = {"ndcg_cut.10", "recall.10", "recall.100", "recip_rank"}


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    judged = {q: docs for q, docs in qrels.items() if q in run and any(g > 0 for g in docs.values())}
    if not judged:
        return {"ndcg@10": 0.0, "mrr@10": 0.0, "recall@10": 0.0, "recall@100": 0.0, "queries": 0}
    # MRR@10: trec_eval's recip_rank has no cut-off, so cut the run at 10 for it.
    top10 = {q: dict(sorted(run[q].items(), key=lambda kv: -kv[1])[:10]) for q in judged}
    full = pytrec_eval.RelevanceEvaluator(judged, MEASURES).evaluate({q: run[q] for q in judged})
    cut = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(top10)
    n = len(judged)
    return {
        "ndcg@10": sum(r["ndcg_cut_10"] for r in full.values()) / n,
        "mrr@10": sum(r["recip_rank"] for r in cut.values()) / n,
        "recall@10": sum(r["recall_10"] for r in full.values()) / n,
        "recall@100": sum(r["recall_100"] for r in full.values()) / n,
        "queries": n,
    }


def per_query(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], measure: str = "ndcg_cut_10"
              ) -> dict[str, float]:
    """One trec_eval measure per judged query (for paired tests between two runs on the same queries)."""
    judged = {q: docs for q, docs in qrels.items() if q in run and any(g > 0 for g in docs.values())}
    if not judged:
        return {}
    scores = pytrec_eval.RelevanceEvaluator(judged, {measure.rsplit("_", 1)[0] if "_cut_" in measure else measure}
                                            ).evaluate({q: run[q] for q in judged})
    return {q: r[measure] for q, r in scores.items()}
