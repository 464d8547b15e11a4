"""One fine-tune cycle, top to bottom:

1. read the stored sessions and split their queries into train and held-out (clicklog.py),
2. propensities by rank (propensity.py) and training examples from the train sessions (examples.py),
3. the parent (blue) model's held-out scores: the bar to beat,
4. Ray Tune over Ray Train trials (tune.py, trainer.py), each trial a child run in MLflow,
5. the best trial's checkpoint assembled into a model directory and registered in MLflow with its
   lineage (parent version, session batch, split seed) and metrics,
6. the quality gate (gate.py) decides whether the version is a candidate for promotion; the decision
   and both scores go to MLflow and Postgres.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from es_ray import metrics
from es_ray.config import Settings
from es_ray.inference import registry
from es_ray.inference.encoder import QUERY_TOWER_DIR, load_encoder, load_tokenizer, query_tower_dir
from es_ray.logs import get_logger
from es_ray.train import gate
from es_ray.train.clicklog import SessionBatch, split_by_query
from es_ray.train.config import FinetuneConfig
from es_ray.train.corpus_queries import corpus_queries
from es_ray.train.examples import build_examples, heldout_labels
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.propensity import propensities
from es_ray.train.trainer import TrainingData, heldout_metrics
from es_ray.train.tune import run_search

log = get_logger(__name__)
EXPERIMENT = "es-ray-finetune"


def _key(metric: str) -> str:
    """MLflow names allow no '@': ndcg@10 -> ndcg_at_10."""
    return metric.replace("@", "_at_")


class NotEnoughData(ValueError):
    """The click log cannot support a fine-tune yet (too few examples or held-out queries)."""


@dataclass
class ParentModel:
    version: int
    model_dir: Path       # the registered model directory (item tower + tokenizer, maybe query_encoder/)
    dim: int
    max_length: int

    @property
    def query_tower(self) -> Path:
        return query_tower_dir(self.model_dir)


def prepare(batch: SessionBatch, items: ItemVectors, texts: dict[str, str], parent: ParentModel,
            config: FinetuneConfig) -> tuple[TrainingData, dict[str, Any]]:
    """Training examples, pseudo-queries from `texts` (object id -> item text) and held-out labels, as
    arrays over the parent's item vectors."""
    train_sessions, heldout_sessions = split_by_query(batch.sessions, config.data.split_seed,
                                                      config.data.heldout_fraction)
    # Examination is estimated from every session: it is about users, not about which queries train.
    props = propensities(batch.sessions, config.debias.examination_prior, config.debias.propensity,
                         config.debias.min_rank_variation, config.debias.propensity_prior_strength)
    examples = build_examples(train_sessions, props, config.debias)
    index = items.index()
    keep = [i for i, pos in enumerate(examples.positives) if pos in index]
    heldout = heldout_labels(heldout_sessions, props, binary_at=config.debias.heldout_relevant_at,
                             click_model=config.debias.enabled)
    qrels = {q: {d: g for d, g in docs.items() if d in index} for q, docs in heldout.qrels.items()}
    qrels = {q: docs for q, docs in qrels.items() if docs}
    pseudo = corpus_queries({k: v for k, v in texts.items() if k in index}, config.train.corpus_queries_per_item,
                            config.train.seed) if config.train.corpus_share > 0 else corpus_queries({})
    details = {"sessions": len(batch.sessions), "train_sessions": len(train_sessions),
               "heldout_sessions": len(heldout_sessions), "heldout_queries": len(qrels),
               "propensity_source": props.source, "propensity": [round(float(p), 4) for p in props.by_rank],
               "propensity_prior": list(config.debias.examination_prior),
               "propensity_details": props.details, **examples.details, "examples": len(keep),
               "corpus_queries": len(pseudo), "items": len(items)}
    if len(items) < 2:
        raise NotEnoughData(f"the collection holds {len(items)} item(s): nothing to rank")
    if len(keep) < config.data.min_train_examples:
        raise NotEnoughData(f"{len(keep)} training examples from {len(train_sessions)} train sessions; "
                            f"at least {config.data.min_train_examples} are needed (data.min_train_examples)")
    if len(qrels) < config.data.min_heldout_queries:
        raise NotEnoughData(f"{len(qrels)} held-out queries with clicks; at least "
                            f"{config.data.min_heldout_queries} are needed (data.min_heldout_queries)")
    data = TrainingData(
        queries=[examples.queries[i] for i in keep],
        positives=np.asarray([index[examples.positives[i]] for i in keep], dtype=np.int64),
        weights=examples.weights[keep],
        excluded={q: np.asarray(sorted(index[d] for d in ds if d in index), dtype=np.int64)
                  for q, ds in examples.excluded.items()},
        corpus_queries=pseudo.texts, corpus_positives=np.asarray([index[d] for d in pseudo.items], dtype=np.int64),
        heldout_queries={q: heldout.queries[q] for q in qrels}, heldout_qrels=qrels,
        heldout_shown={q: sorted(d for d in heldout.shown[q] if d in index) for q in qrels}, items=items,
        parent_dir=str(parent.query_tower), max_query_length=config.model.max_query_length,
        # One epoch is one pass over the clicks, whether they became one example each (naive, ips) or
        # were aggregated per (query, item) pair (posterior): both methods get the same step budget.
        epoch_size=max(len(keep), examples.details["clicks"]))
    return data, details


def assemble_model_dir(parent: ParentModel, checkpoint_path: str, target: Path) -> Path:
    """The parent's directory (item tower, tokenizer) with the trained query tower inside it."""
    shutil.copytree(parent.model_dir, target, ignore=shutil.ignore_patterns(QUERY_TOWER_DIR))
    shutil.copytree(Path(checkpoint_path) / QUERY_TOWER_DIR, target / QUERY_TOWER_DIR)
    return target


def _close_trial_runs(mlflow_client, parent_run_id: str, statuses: dict[str, str]) -> None:
    """Trials that ASHA stopped never finish their own MLflow run: end each with what happened."""
    for run in mlflow_client.search_runs([mlflow_client.get_run(parent_run_id).info.experiment_id],
                                         f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        trial_id = run.data.tags.get("es_ray.trial_id", "")
        status = statuses.get(trial_id, "error")
        mlflow_client.set_tag(run.info.run_id, "es_ray.trial_status", status)
        if run.info.status == "RUNNING":
            mlflow_client.set_terminated(run.info.run_id, "KILLED" if status == "stopped" else "FAILED")


def fine_tune(settings: Settings, config: FinetuneConfig, batch: SessionBatch, items: ItemVectors,
              texts: dict[str, str], parent: ParentModel, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs one cycle and registers its best model; returns what happened (for the task's result)."""
    import mlflow
    import ray

    started = time.monotonic()
    progress = progress or (lambda _: None)
    mlflow_client = registry.client(registry.tracking_uri(settings))
    experiment_id = registry.ensure_experiment(settings, EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"fine-tune-from-v{parent.version}") as run:
        progress({"stage": "preparing data"})
        data, details = prepare(batch, items, texts, parent, config)
        lineage = {"parent_version": parent.version, "split_seed": config.data.split_seed,
                   "heldout_fraction": config.data.heldout_fraction, **batch.lineage()}
        mlflow.log_params({**{f"{section}.{k}": v for section, values in config.model_dump().items()
                              if section != "space" for k, v in values.items()}, **lineage})
        mlflow.log_dict(config.model_dump(), "finetune_config.json")
        mlflow.log_dict({"details": details, "heldout_queries": sorted(data.heldout_queries.values())}, "data.json")
        mlflow.set_tags({"es_ray.role": "fine-tune", **{f"es_ray.{k}": str(v) for k, v in lineage.items()}})

        progress({"stage": "scoring the blue model", **{k: details[k] for k in ("examples", "heldout_queries")}})
        blue_scores = heldout_metrics(load_encoder(parent.query_tower), load_tokenizer(parent.query_tower), data, "cpu")
        mlflow.log_metrics({f"blue_{_key(k)}": v for k, v in blue_scores.items()})

        progress({"stage": "tuning", "trials_total": config.tune.num_samples})
        storage = settings.state_path / "ray_results"
        outcome = run_search(config, ray.put(data), storage, f"fine-tune-{run.info.run_id[:8]}",
                             mlflow={"tracking_uri": registry.tracking_uri(settings), "experiment_id": experiment_id,
                                     "parent_run_id": run.info.run_id},
                             progress=lambda p: progress({"stage": "tuning", **p}),
                             batch_nice=settings.ray.batch_nice)
        _close_trial_runs(mlflow_client, run.info.run_id, {t.trial_id: t.status for t in outcome.trials})
        best = outcome.best(config.tune.metric)
        if best is None:
            errors = sorted({t.error for t in outcome.trials if t.error})
            raise RuntimeError(f"none of {len(outcome.trials)} trials produced a checkpoint "
                               f"({', '.join(sorted({t.status for t in outcome.trials}))})"
                               + (f"; trial errors: {' | '.join(errors)[:1500]}" if errors else ""))
        new_scores = {k: best.metrics[k] for k in ("ndcg@10", "mrr@10", "recall@100")}
        decision = gate.decide(new_scores, blue_scores, config.gate)
        metrics.count("es_ray_gate_decisions", decision="passed" if decision.candidate else "refused")
        for trial in outcome.trials:
            metrics.count("es_ray_finetune_trials", status=trial.status)
        mlflow.log_metrics({f"best_{_key(k)}": v for k, v in new_scores.items()})
        mlflow.log_metrics({"tune_wall_s": outcome.wall_s, "ideal_wall_s": outcome.ideal_wall_s})
        mlflow.set_tags({"es_ray.gate": "candidate" if decision.candidate else "rejected",
                         "es_ray.gate_reason": decision.reason})

        progress({"stage": "registering"})
        with tempfile.TemporaryDirectory(dir=settings.state_path) as tmp:
            model_dir = assemble_model_dir(parent, best.checkpoint_path, Path(tmp) / "model")
            tags = {**{f"es_ray.{k}": v for k, v in lineage.items()}, "es_ray.trial_id": best.trial_id,
                    "es_ray.trial_config": best.config, "es_ray.towers": config.model.towers,
                    "es_ray.debias": details["method"], "es_ray.propensity_source": details["propensity_source"],
                    "es_ray.gate": "candidate" if decision.candidate else "rejected",
                    "es_ray.gate_reason": decision.reason,
                    **{f"es_ray.heldout.{_key(k)}": round(v, 6) for k, v in new_scores.items()},
                    **{f"es_ray.blue.{_key(k)}": round(v, 6) for k, v in blue_scores.items()}}
            version = registry.register_version(settings, run.info.run_id, model_dir,
                                                f"fine-tuned from v{parent.version} on {lineage['sessions']} sessions",
                                                tags)
        local_dir = registry.download(settings, version)
    result = {
        "version": version, "parent_version": parent.version, "candidate": decision.candidate,
        "gate": decision.as_dict(), "heldout": new_scores, "blue_heldout": blue_scores, "best_trial": {
            "trial_id": best.trial_id, "config": best.config, "step": best.metrics.get("step")},
        "trials": [{"trial_id": t.trial_id, "status": t.status, "seconds": round(t.seconds, 1), "reports": t.reports,
                    "config": t.config, "error": t.error, **{k: round(v, 4) for k, v in t.metrics.items()}}
                   for t in outcome.trials],
        "tune_wall_s": round(outcome.wall_s, 1), "ideal_wall_s": round(outcome.ideal_wall_s, 1),
        "mlflow_run_id": run.info.run_id, "model_dir": str(local_dir), "data": details, "lineage": lineage,
        "seconds": round(time.monotonic() - started, 1)}
    log.info("finetune.done", version=version, candidate=decision.candidate, reason=decision.reason,
             trials=len(outcome.trials), seconds=result["seconds"])
    return result


def load_item_vectors(conn, collection, batch: SessionBatch, limit: int, seed: int) -> ItemVectors:
    """The model's own vectors (before click adjustments) of every item the sessions showed, plus a
    seeded sample of the rest up to `limit` items (all items in a small collection)."""
    shown = sorted({item for s in batch.sessions for _, item in s.shown})
    sample = collection.sample_ids(conn, max(0, limit - len(shown)), seed)
    return ItemVectors.from_chunks(collection.chunk_vectors(conn, sorted(set(shown) | set(sample)), model=True))
