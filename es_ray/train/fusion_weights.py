"""The hybrid fusion learned from clicks: RRF's constant k and the lexical list's weight, per collection.

Every hybrid session records each shown result's rank in the dense and in the lexical list (migration
0009), so the RRF score any other (k, weight) would have given it is known exactly (store/fusion.rrf_score):
the log can be re-fused offline. The learner uses the fine-tune's debiasing and validation unchanged
(configs/finetune.yaml): sessions through the learning guards, queries split into train and held-out by
the same seeded hash, examination propensities from every session, labels from the click model's
relevance posterior (train/examples.heldout_labels). Each (k, weight) of the grid (search.learned_* in
configs/stack.yaml; the dense weight stays 1: only the ratio orders RRF) is scored by nDCG@10 on the train
queries' labels, the best one then on the held-out queries against the current fusion, and only the gate
(train/gate.decide, the fine-tune's metric and margin) makes it a candidate.

Re-fusing only what was shown is biased two ways, and the two do not cancel in general:
- Labels exist only for items some logged page showed: a fusion that would surface relevant items never
  shown gets no credit for them (this favours the fusions that served; the gate's comparison is
  conservative in that direction). If the current fusion ranked every page it would always win on its
  own log, so search explores (serve/fusion_exploration.py): a share of anonymous hybrid searches is
  ranked by one of the current fusion's grid neighbours, and its sessions record the items it surfaced
  with their list ranks like any other. logged_lists takes the union of every session's shown items per
  query, so each fusion is replayed over everything any of them showed: the bias shrinks to items that
  neither the current fusion nor an explored one put on a page, and to queries no explored search reached.
  A click on an item only explored pages showed teaches, like any other, once learning.min_clients
  people clicked it (the learning guards): a query needs several explored readers before it does.
- Under another fusion, items never shown may climb above shown ones (intruders); leaving them out would
  score every far-away fusion as if only the logged page existed (this favours change). What the ranks
  do tell: a list rank r that no shown item holds belongs to an unshown item, and if weight / (k + r)
  alone beats a shown item's re-fused score, that unshown item ranks above it whatever its other rank.
  Each shown item is pushed down by that many sure intruders (the larger count of the two lists, ranks
  only up to the deepest one a shown item holds: they surely exist), unlabelled. It is a lower bound, so
  the second bias is reduced, not removed.
The gate on held-out queries and the benchmark's test queries (es_ray/bench/hybrid.py) are the checks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from es_ray.store.clickstream import LoggedSession, normalise_query
from es_ray.store.fusion import Fusion, rrf_score
from es_ray.train.clicklog import split_by_query
from es_ray.train.config import FinetuneConfig
from es_ray.train.evaluation import evaluate
from es_ray.train.examples import heldout_labels
from es_ray.train.gate import GateDecision, decide
from es_ray.train.propensity import propensities


class NotEnoughData(ValueError):
    """Too few hybrid sessions with clicks to learn or to validate a fusion."""


@dataclass
class LoggedLists:
    """One query's logged hybrid results: item -> (dense rank, lexical rank) in the latest session that
    showed it. Items of different sessions may hold the same rank (the lists changed between them, e.g.
    by an upsert); the sure-intruder count below then errs on the side of fewer intruders."""

    ranks: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)


@dataclass
class FusionLearning:
    current: Fusion
    chosen: Fusion                          # the grid's best on the train queries
    train_scores: dict[str, float]          # key(fusion) -> the gate metric on the train queries
    heldout: dict[str, dict[str, float]]    # "chosen" and "current" -> held-out scores
    decision: GateDecision
    details: dict

    def as_dict(self) -> dict:
        return {"current": asdict(self.current), "chosen": asdict(self.chosen), "train_scores": self.train_scores,
                "heldout": self.heldout, "decision": self.decision.as_dict(), "details": self.details}


def logged_lists(sessions: list[LoggedSession]) -> dict[str, LoggedLists]:
    """Per normalised query, every result any of its hybrid sessions showed, with its two list ranks in the
    latest of them (a union over sessions, not one replayed page)."""
    out: dict[str, LoggedLists] = {}
    for s in sorted(sessions, key=lambda s: (s.created_at is not None, s.created_at or 0, s.session_id)):
        lists = out.setdefault(normalise_query(s.query), LoggedLists())
        for _, item in s.shown:
            if item in s.list_ranks:
                lists.ranks[item] = s.list_ranks[item]
    return out


def replayed_run(lists: LoggedLists, fusion: Fusion) -> dict[str, float]:
    """The logged results re-fused, each pushed down by its sure intruders (module doc), as a run for
    pytrec_eval: scores by position, the intruders as unlabelled placeholders."""
    scored = sorted(((rrf_score(fusion, d, l), item) for item, (d, l) in lists.ranks.items()),
                    key=lambda t: (-t[0], t[1]))
    shown_dense = {d for d, _ in lists.ranks.values() if d is not None}
    shown_lexical = {l for _, l in lists.ranks.values() if l is not None}

    def sure_above(score: float, weight: float, occupied: set[int]) -> int:
        # unshown ranks r <= the deepest shown one with weight / (k + r) > score
        return sum(1 for r in range(1, max(occupied, default=0) + 1)
                   if r not in occupied and weight / (fusion.k + r) > score) if weight > 0 else 0

    run: dict[str, float] = {}
    position = 0
    for index, (score, item) in enumerate(scored):
        intruders = max(sure_above(score, fusion.dense_weight, shown_dense),
                        sure_above(score, fusion.lexical_weight, shown_lexical))
        target = max(index + intruders, position)
        while position < target:   # unlabelled placeholders fill the intruders' places
            run[f"~intruder-{position}"] = -position
            position += 1
        run[item] = -position
        position += 1
    return run


def score(lists: dict[str, LoggedLists], qrels: dict[str, dict[str, int]], fusion: Fusion) -> dict[str, float]:
    run = {q: replayed_run(lists[q], fusion) for q in qrels if q in lists}
    return evaluate(run, qrels)


def key(fusion: Fusion) -> str:
    return f"k={fusion.k:g},dense={fusion.dense_weight:g},lexical={fusion.lexical_weight:g}"


def learn(sessions: list[LoggedSession], current: Fusion, candidates: list[Fusion], config: FinetuneConfig
          ) -> FusionLearning:
    """`sessions`: the guarded click log (train/clicklog.read_sessions); the hybrid ones with list ranks
    teach, all of them give the propensities. Raises NotEnoughData."""
    if current.method != "rrf":
        raise ValueError("only RRF can be re-fused from logged ranks (search.fusion is weighted)")
    hybrid = [s for s in sessions if s.mode == "hybrid" and s.list_ranks]
    train, heldout = split_by_query(hybrid, config.data.split_seed, config.data.heldout_fraction)
    d = config.debias
    props = propensities(sessions, d.examination_prior, d.propensity, d.min_rank_variation,
                         d.propensity_prior_strength)
    train_labels = heldout_labels(train, props, binary_at=d.heldout_relevant_at, click_model=d.enabled)
    heldout_labels_ = heldout_labels(heldout, props, binary_at=d.heldout_relevant_at, click_model=d.enabled)
    details = {"hybrid_sessions": len(hybrid), "train_sessions": len(train), "heldout_sessions": len(heldout),
               "train_queries": len(train_labels.qrels), "heldout_queries": len(heldout_labels_.qrels),
               "propensity_source": props.source}
    for name, labels in (("train", train_labels), ("held-out", heldout_labels_)):
        if len(labels.qrels) < config.data.min_heldout_queries:
            raise NotEnoughData(f"{len(labels.qrels)} {name} queries with hybrid clicks; at least "
                                f"{config.data.min_heldout_queries} are needed (data.min_heldout_queries)")
    train_lists, heldout_lists = logged_lists(train), logged_lists(heldout)
    tried = [current, *(f for f in candidates if f != current)]
    train_scores = {key(f): score(train_lists, train_labels.qrels, f)[config.gate.metric] for f in tried}

    def distance(f: Fusion) -> float:
        def share(g: Fusion) -> float:
            return g.lexical_weight / max(g.dense_weight + g.lexical_weight, 1e-9)
        return abs(share(f) - share(current)) + abs(f.k - current.k) / 100

    # The best on train; among equals the current one, else the nearest to it (no change without evidence).
    chosen = max(tried, key=lambda f: (round(train_scores[key(f)], 9), f == current, -distance(f)))
    scores = {"chosen": score(heldout_lists, heldout_labels_.qrels, chosen),
              "current": score(heldout_lists, heldout_labels_.qrels, current)}
    decision = decide(scores["chosen"], scores["current"], config.gate)
    if chosen == current:
        decision = GateDecision(False, decision.metric, decision.new, decision.blue, decision.margin,
                                "the current fusion scores best on the train queries")
    return FusionLearning(current, chosen, {k: round(v, 6) for k, v in train_scores.items()},
                          {name: {m: round(v, 6) for m, v in s.items()} for name, s in scores.items()},
                          decision, details)
