"""One learning of the blue collection's hybrid fusion from the click log: learn (train/fusion_weights.py),
record it in MLflow, and promote it (store/fusion_weights.py) only when the gate says so.

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
from es_ray.store.fusion import Fusion
from es_ray.train.clicklog import read_sessions
from es_ray.train.config import FinetuneConfig, load_finetune_config
from es_ray.train.fusion_weights import FusionLearning, grid, key, learn

log = get_logger(__name__)
EXPERIMENT = "es-ray-fusion"


def _metric(name: str) -> str:
    return name.replace("@", "_at_")


def learn_and_promote(settings: Settings, dsn: str, config: FinetuneConfig | None = None,
                      since: datetime | None = None) -> dict:
    """Learns the blue collection's fusion; returns what was decided (raises NotEnoughData). `since`: only
    sessions recorded from then on (a benchmark's own)."""
    import mlflow

    config = config or load_finetune_config()
    s = settings.search
    with db.connect(dsn) as conn:
        blue = blue_green.get_blue(conn)
        if blue is None:
            raise RuntimeError("no blue collection yet")
        current = fusion_weights.learned(conn).get(blue.collection) or \
            Fusion(s.fusion, s.rrf_k, s.dense_weight, s.lexical_weight)
        batch = read_sessions(conn, config.data.max_sessions, settings.learning)
    sessions = [x for x in batch.sessions if x.model_version == blue.model_version
                and (since is None or x.created_at >= since)]
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
        mlflow.set_tags({"es_ray.role": "fusion", "es_ray.collection": blue.collection,
                         "es_ray.gate": "promoted" if learned.decision.candidate else "rejected",
                         "es_ray.gate_reason": learned.decision.reason})
        run_id = run.info.run_id
    if learned.decision.candidate:
        with db.connect(dsn) as conn:
            fusion_weights.promote(conn, blue.collection, learned.chosen, run_id, learned.decision.as_dict())
    log.info("fusion.learned", collection=blue.collection, chosen=key(learned.chosen), current=key(current),
             promoted=learned.decision.candidate, reason=learned.decision.reason)
    return {"collection": blue.collection, "promoted": learned.decision.candidate, "mlflow_run_id": run_id,
            "fusion": asdict(learned.chosen if learned.decision.candidate else current), **learned.as_dict()}
