"""One learning of the blue collection's hybrid fusion from the click log: learn (train/fusion_weights.py),
record it in MLflow (a run, and a version of the registered model mlflow.registered_fusion tagged as the
fine-tune tags its versions: candidate or rejected, then promoted or superseded), and promote it
(store/fusion_weights.py) only when the gate says so and nobody promoted another fusion meanwhile.

Runs in-process (`es-ray learn-fusion`, the hybrid benchmark): re-fusing logged ranks over a small grid
takes seconds, so it needs neither a Ray job nor a task. Only sessions the blue model's collection
ranked teach it: another collection's dense ranks came from another model.
"""

from __future__ import annotations

import json
from datetime import datetime
from dataclasses import asdict

from es_ray.config import Settings
from es_ray.inference import registry
from es_ray.logs import get_logger
from es_ray.store import blue_green, db, fusion_weights
from es_ray.store.fusion import Fusion, grid
from es_ray.train.clicklog import read_sessions
from es_ray.train.config import FinetuneConfig, load_finetune_config
from es_ray.train.fusion_weights import FusionLearning, key, learn

log = get_logger(__name__)
EXPERIMENT = "es-ray-fusion"


class FusionNotLearnable(ValueError):
    """The settings or the stack leave nothing to learn (a weighted fusion, no blue collection)."""


def _metric(name: str) -> str:
    return name.replace("@", "_at_")


def learn_and_promote(settings: Settings, dsn: str, config: FinetuneConfig | None = None,
                      since: datetime | None = None) -> dict:
    """Learns the blue collection's fusion; returns what was decided (raises NotEnoughData). `since`: only
    sessions recorded from then on (a benchmark's own), before the learning guards (clicklog.read_sessions)."""
    import mlflow

    config = config or load_finetune_config()
    s = settings.search
    if s.fusion != "rrf":
        raise FusionNotLearnable("learn-fusion learns RRF's k and weights from logged list ranks; "
                                 f"search.fusion is {s.fusion!r}")
    with db.connect(dsn) as conn:
        blue = blue_green.get_blue(conn)
        if blue is None:
            raise FusionNotLearnable("no blue collection yet: load items first")
        serving = fusion_weights.learned(conn).get(blue.collection)   # None: the configured fusion serves
        current = serving or Fusion.configured(s)
        batch = read_sessions(conn, config.data.max_sessions, settings.learning, since)
    sessions = [x for x in batch.sessions if x.model_version == blue.model_version]
    learned: FusionLearning = learn(sessions, current, grid(s.learned_lexical_weights, s.learned_rrf_ks,
                                                            current.dense_weight), config)
    registry.client(registry.tracking_uri(settings))
    experiment_id = registry.ensure_experiment(settings, EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"fusion-{blue.collection}") as run:
        mlflow.log_params({"collection": blue.collection, "model_version": blue.model_version,
                           "current": key(current), "chosen": key(learned.chosen),
                           "grid_lexical_weights": json.dumps(s.learned_lexical_weights),
                           "grid_rrf_ks": json.dumps(s.learned_rrf_ks), "gate.metric": config.gate.metric,
                           "gate.margin": config.gate.margin})
        mlflow.log_metrics({f"heldout_{name}_{_metric(m)}": v for name, scores in learned.heldout.items()
                            for m, v in scores.items() if m != "queries"})
        mlflow.log_dict({**learned.as_dict(), "sessions": batch.lineage(), "dropped": batch.dropped}, "fusion.json")
        gate = {"es_ray.gate": "candidate" if learned.decision.candidate else "rejected",
                "es_ray.gate_reason": learned.decision.reason}
        mlflow.set_tags({"es_ray.role": "fusion", "es_ray.collection": blue.collection, **gate})
        run_id = run.info.run_id
    version = registry.register_fusion(
        settings, run_id, f"{key(learned.chosen)} for {blue.collection}",
        {"es_ray.collection": blue.collection, "es_ray.model_version": blue.model_version, "es_ray.fusion":
         key(learned.chosen), "es_ray.replaces": key(current), **gate})
    promoted = False
    if learned.decision.candidate:
        with db.connect(dsn) as conn:
            promoted = fusion_weights.promote(conn, blue.collection, learned.chosen, serving, run_id, version,
                                              learned.decision.as_dict())
        # Tagged after the commit: MLflow never says "promoted" of a fusion that did not serve.
        outcome = {"es_ray.gate": "promoted" if promoted else "superseded"}
        registry.tag_version(settings, settings.mlflow.registered_fusion, version, outcome)
        registry.client(registry.tracking_uri(settings)).set_tag(run_id, "es_ray.gate", outcome["es_ray.gate"])
    log.info("fusion.learned", collection=blue.collection, chosen=key(learned.chosen), current=key(current),
             candidate=learned.decision.candidate, promoted=promoted, reason=learned.decision.reason,
             mlflow_version=version)
    return {"collection": blue.collection, "promoted": promoted, "mlflow_run_id": run_id, "mlflow_version": version,
            "superseded": learned.decision.candidate and not promoted,
            "fusion": asdict(learned.chosen if promoted else current), **learned.as_dict()}


def forget_promoted(settings: Settings, dsn: str) -> str | None:
    """Withdraws the blue collection's promoted fusion (search.* serves again); returns the collection,
    None when it had none."""
    with db.connect(dsn) as conn:
        blue = blue_green.get_blue(conn)
        if blue is None or fusion_weights.record(conn, blue.collection) is None:
            return None
        fusion_weights.forget(conn, blue.collection)
    log.info("fusion.forgotten", collection=blue.collection)
    return blue.collection
