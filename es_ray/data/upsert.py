"""Bulk upsert as a Ray job.

    ray job submit --working-dir . -- python -m es_ray.data.upsert --input corpus.jsonl

Reads JSON lines (BEIR corpus records `_id`/`title`/`text`/`metadata`, or es-ray items
`id`/`text`/`payload`) with Ray Data, embeds batches through Triton from an actor pool and writes
them with COPY into the blue collection. Idempotent by id: running it again replaces the same items.
Exits non-zero if any item failed; the failures are listed in the last log line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import ray
from tqdm import tqdm

from es_ray import metrics
from es_ray.config import Settings
from es_ray.data.pipeline import parse_jsonl, upsert_dataset
from es_ray.lifecycle.handle import get_driver
from es_ray.logs import get_logger
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
    blue = Blue(**ray.get(get_driver(args.namespace).blue.remote()))

    total = count_lines(path)
    started = time.monotonic()
    log.info("upsert.start", input=str(path), items=total, collection=blue.collection, model_version=blue.model_version)
    dataset = ray.data.read_text(str(path)).map_batches(parse_jsonl, batch_size=1024)
    written, failed = 0, []
    with tqdm(total=total, desc="upsert", unit="item", file=sys.stderr) as progress:
        for batch in upsert_dataset(dataset, settings, manifest.triton_grpc_url, manifest.postgres_dsn):
            errors = [{"id": str(i), "error": str(e)} for i, e in zip(batch["id"], batch["error"]) if e]
            failed.extend(errors)
            written += len(batch["id"]) - len(errors)
            metrics.count("es_ray_upsert_items", len(batch["id"]) - len(errors), path="job")
            metrics.count("es_ray_upsert_failures", len(errors), path="job")
            progress.update(len(batch["id"]))
    seconds = time.monotonic() - started
    log.info("upsert.done", upserted=written, failed=len(failed), seconds=round(seconds, 1),
             items_per_s=round(written / max(seconds, 1e-9), 2), failures=failed[:20])
    print(json.dumps({"upserted": written, "failed": failed}))  # the job's result, last line of its logs
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
