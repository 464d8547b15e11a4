"""The fine-tune job.

    ray job submit --working-dir . -- python -m es_ray.train --config configs/finetune.yaml

Runs against the stack's Ray cluster: reads the click log from Postgres, runs the Tune search,
registers the best model in MLflow and records the gate's decision. Its task row (created here, or
passed by `POST /v1/tasks/fine-tune` as --task-id) shows progress and ends done or failed with the
reason; a heartbeat tells the lifecycle driver the job is alive. The last line printed is the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from es_ray.data import ray_data_actors
from es_ray.inference import registry
from es_ray.lifecycle.task_job import JobRefused, TaskJob, run_as_task
from es_ray.store import blue_green, db, tasks
from es_ray.store.collections import Collection
from es_ray.train.clicklog import read_sessions
from es_ray.train.config import load_finetune_config
from es_ray.train.finetune import ParentModel, fine_tune, load_item_vectors


def run(settings, manifest, config, progress) -> dict[str, Any]:
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)
        batch = read_sessions(conn, config.data.max_sessions, settings.learning)
        collection = Collection(blue.collection, blue.dim)
        items = load_item_vectors(conn, collection, batch, config.data.eval_corpus_items, config.data.split_seed)
        texts = collection.texts(conn, items.ids) if config.train.corpus_share > 0 else {}
    parent = ParentModel(blue.model_version, Path(blue.source_dir), blue.dim, blue.max_length)
    with ray_data_actors.in_use(manifest.postgres_dsn):  # its trials use the autoscaling coordinator
        result = fine_tune(settings, config, batch, items, texts, parent, progress)
    with db.connect(manifest.postgres_dsn) as conn:
        state = "candidate" if result["candidate"] else "rejected"
        blue_green.save_model(conn, blue_green.ModelRecord(result["version"], registry.model_uri(settings, result["version"]),
                                                         result["model_dir"], blue.dim, blue.max_length, state))
        blue_green.record_lineage(conn, result["version"], blue.model_version, result["heldout"], result["gate"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="fine-tune YAML (default configs/finetune.yaml)")
    parser.add_argument("--overrides", default="{}", help="JSON object merged over the config file")
    parser.add_argument("--task-id", default=None, help="an existing pending task to run (set by the HTTP API)")
    parser.add_argument("--namespace", default="es-ray", help="Ray namespace of the lifecycle driver")
    args = parser.parse_args(argv)

    if args.config is not None and not args.config.exists():
        parser.error(f"--config {args.config} does not exist")
    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as err:
        parser.error(f"--overrides is not JSON: {err}")

    def work(job: TaskJob) -> dict[str, Any]:
        merged = {**job.task.params.get("config", {}), **overrides}  # a task submitted over HTTP brings its own
        try:
            config = load_finetune_config(args.config, merged)
        except (ValidationError, ValueError) as err:
            raise JobRefused(f"invalid fine-tune config: {err}") from None
        return run(job.settings, job.manifest, config, job.progress)

    return run_as_task(tasks.FINE_TUNE, args.namespace, args.task_id, {"config": overrides}, work,
                       lambda r: {"version": r["version"], "candidate": r["candidate"], "gate": r["gate"]["reason"]})


if __name__ == "__main__":
    sys.exit(main())
