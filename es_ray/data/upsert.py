"""Bulk upsert as a Ray job.

    ray job submit --working-dir . -- python -m es_ray.data.upsert --input corpus.jsonl

Reads JSON lines (BEIR corpus records `_id`/`title`/`text`/`metadata`, or es-ray items
`id`/`text`/`payload`) with Ray Data, embeds batches through Triton from an actor pool and writes
them with COPY into the blue collection. Idempotent by id: running it again replaces the same items.
Exits non-zero if any item failed; the failures are listed in the last lines.

Its terminal (`ray job logs`) shows the steps, a progress line every few seconds
("upsert: 200/1000 items (20%, ...)", which `es-ray demo` follows as a bar) and the result as the last
lines, JSON; every log line (ours, Ray's, Ray Data's) goes to <state dir>/logs/upsert.log.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ray

from es_ray import metrics
from es_ray.config import Settings
from es_ray.console import Display
from es_ray.data import ray_data_actors
from es_ray.data.pipeline import parse_jsonl, upsert_dataset
from es_ray.lifecycle.handle import get_driver
from es_ray.logs import get_logger, to_file
from es_ray.priority import run_as_batch
from es_ray.stack.manifest import StackManifest
from es_ray.store.blue_green import Blue

log = get_logger("es_ray.data.upsert")


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="JSON-lines file of items (BEIR corpus layout)")
    parser.add_argument("--namespace", default="es-ray", help="Ray namespace of the lifecycle driver")
    parser.add_argument("--encoders", type=int, default=0, help="Embedding actors (default: upsert.encoders)")
    args = parser.parse_args(argv)

    path = args.input.resolve()
    if not path.exists():
        parser.error(f"--input {path} does not exist")
    ray.init(address="auto", namespace=args.namespace, logging_level="warning")
    stack = ray.get(get_driver(args.namespace).stack.remote())
    settings = Settings.model_validate(stack["settings"])
    if args.encoders:
        settings.upsert.encoders = args.encoders
    manifest = StackManifest.model_validate(stack["manifest"])
    run_as_batch(settings.ray.batch_nice)
    blue = Blue(**ray.get(get_driver(args.namespace).blue.remote()))
    # Ray Data's own progress bars would only fill the log file; ours is the line the follower reads.
    ray.data.DataContext.get_current().enable_progress_bars = False

    log_path = settings.state_path / "logs" / "upsert.log"
    with to_file(log_path) as terminal, Display(terminal, every_s=5) as display:
        display.note(f"logs: {log_path}")
        total = count_lines(path)
        display.step(f"upsert {total} items of {path.name} into {blue.collection} (model v{blue.model_version})")
        started = time.monotonic()
        log.info("upsert.start", input=str(path), items=total, collection=blue.collection,
                 model_version=blue.model_version)
        dataset = ray.data.read_text(str(path)).map_batches(parse_jsonl, batch_size=1024)
        written, failed = 0, []
        with display.bar("upsert", total=total, unit="items") as progress, \
                ray_data_actors.in_use(manifest.postgres_dsn):
            for batch in upsert_dataset(dataset, settings, manifest.triton_grpc_url, manifest.postgres_dsn):
                errors = [{"id": str(i), "error": str(e)} for i, e in zip(batch["id"], batch["error"]) if e]
                failed.extend(errors)
                written += len(batch["id"]) - len(errors)
                metrics.count("es_ray_upsert_items", len(batch["id"]) - len(errors), path="job")
                metrics.count("es_ray_upsert_failures", len(errors), path="job")
                progress.advance(len(batch["id"]))
        seconds = time.monotonic() - started
        done = {"upserted": written, "failed": len(failed), "seconds": round(seconds, 1),
                "items_per_s": round(written / max(seconds, 1e-9), 2), "failures": failed[:20]}
        log.info("upsert.done", **done)
        # The result, for programs that read the job's logs: the summary (benchmarks read its seconds),
        # then {"upserted", "failed"} as the last line.
        print(json.dumps({"event": "upsert.done", **done}), file=terminal)
        print(json.dumps({"upserted": written, "failed": failed}), file=terminal)
    # Its Ray Data work is over: the driver stops Ray Data's detached actors if no other work uses them
    # (waited for: a call still unsent when the job exits would be lost; else the next turn does it).
    try:
        ray.get(get_driver(args.namespace).wake_housekeeping.remote(), timeout=10)
    except Exception as err:  # noqa: BLE001 - the items are stored; the actors only wait a turn longer
        log.warning("upsert.wake_failed", error=str(err))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
