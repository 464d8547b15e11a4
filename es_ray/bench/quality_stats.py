"""The quality harness's statistics: means over runs, the paired test between two methods, and how
well the gate's held-out metrics agree with the test qrels."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats


def mean_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}


def paired(a: list[dict[str, float]], b: list[dict[str, float]], seed: int = 0) -> dict[str, float]:
    """b - a over test queries (per-query nDCG@10 averaged over runs first): a two-sided paired
    randomisation test and a 95% bootstrap interval of the mean difference (scipy.stats)."""
    queries = sorted(a[0])
    # Rounded far below any real difference: the mean of equal values can differ from one of them in the
    # last bit, and the tests would read that noise as a difference.
    x = np.round([np.mean([run[q] for run in a]) for q in queries], 9)
    y = np.round([np.mean([run[q] for run in b]) for q in queries], 9)
    test = stats.permutation_test((x, y), lambda u, v: np.mean(v - u), permutation_type="samples",
                                  n_resamples=10_000, random_state=seed)
    if np.ptp(y - x) == 0:   # every query differs alike (e.g. not at all): BCa is undefined, the interval is that
        low = high = float((y - x)[0])
    else:
        interval = stats.bootstrap(((y - x),), np.mean, n_resamples=10_000, random_state=seed).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {"mean_difference": round(float(np.mean(y - x)), 4), "p_randomisation": round(float(test.pvalue), 4),
            "bootstrap_95": [round(low, 4), round(high, 4)]}


def gate_agreement(logs: list[dict[str, list[tuple[float, ...]]]], gate_checks: list[dict[str, Any]],
                   worse_checks: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """How the gate's view agrees with the test qrels. `logs`: per click log and method, the gate's view
    of the blue model then of every checkpoint (Harness.gate_point); `gate_checks`: every fine-tuned
    model's test gain, held-out gain and whether it passed; `worse_checks`: the same for degraded blue models."""

    def tau(points, column):
        return float(stats.kendalltau([p[column] for p in points], [p[2] for p in points]).statistic)

    series = [points for by_method in logs for points in by_method.values() if len(points) > 2]
    taus = [tau(points, 0) for points in series]
    whole = [tau(points, 1) for points in series]
    others = {name: round(float(np.nanmean([tau(points, column) for points in series])), 4)
              for name, column in (("condensed_mrr@10", 3), ("shown_log_likelihood", 4), ("graded_labels", 5))
              if series}
    better = [g for g in gate_checks if g["test_gain"] >= 0.01]
    worse = [g for g in worse_checks if g["test_gain"] <= -0.01]
    # Every checkpoint against the blue model of its log, as the gate would compare them.
    ahead = [(p[0] > points[0][0]) for points in series for p in points[1:] if p[2] - points[0][2] >= 0.01]
    return {
        "candidates": "per click log and method: the blue model and every checkpoint of that method's runs on "
                      "that log, scored by the method's held-out labels and by the test qrels",
        "kendall_tau_mean": round(float(np.nanmean(taus)), 4) if taus else None,
        "kendall_tau_per_log_and_method": [round(t, 3) for t in taus],
        "kendall_tau_whole_collection_mean": round(float(np.nanmean(whole)), 4) if whole else None,
        "kendall_tau_other_heldout_metrics": others,
        "models_0.01_better_on_test": len(better), "of_them_passed": sum(g["passed"] for g in better),
        "checkpoints_0.01_better_on_test": len(ahead), "of_them_ahead_on_heldout": int(sum(ahead)),
        "models_0.01_worse_on_test": len(worse), "of_them_refused": sum(not g["passed"] for g in worse),
        "worse_models": "the blue model with Gaussian noise on its query vectors (sd 0.01-0.05, 3 draws each, "
                        "per click log): a worse ranking the gate must refuse",
        "checks": gate_checks, "worse_checks": worse_checks, "margin": margin,
        "points": [{method: [[round(float(v), 4) for v in point] for point in points]
                    for method, points in by_method.items()} for by_method in logs]}
