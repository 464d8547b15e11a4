"""Ingest benchmark: documents/s through the bulk upsert job vs the raw forward pass of the served model.

    python -m es_ray.bench.ingest --data ../shared/data/scifact --docs 1000

Both sides embed the same documents, chunked the same way, at the same batch size and max_length,
one after the other in the same run (so neither competes with the other for the 2 cores). The raw
side is what the pipeline is measured against: tokenise + chunk + forward of blue's served model file
in its runtime on every core (model.onnx in ONNX Runtime; eager torch where no served file is found,
recorded in `raw_runtime`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from es_ray.bench.common import DEFAULT_STATE, bench_stack, only_blue_live, write_result
from es_ray.data import beir
from es_ray.inference.chunking import forward_passes, split
from es_ray.data.corpus import read_corpus
from es_ray.inference.encoder import load_encoder, load_tokenizer
from es_ray.inference.triton_repo import ITEM_ENCODER, model_file, version_dir
from es_ray.stack import jobs, triton
from es_ray.store import db, blue_green


def raw_forward(texts: list[str], model_dir: str, batch_items: int, max_rows: int, max_length: int, overlap: int,
                max_chunks: int, model_file: Path | None = None) -> tuple[float, int]:
    """Seconds to tokenise, chunk and embed `texts` in this process, batched as the pipeline batches them:
    with `model_file`, the served file in its runtime on every core (the fastest forward pass of what is
    served: bench/runtimes.served_forward); without, eager torch."""
    tokenizer = load_tokenizer(model_dir)
    if model_file is not None:
        from es_ray.bench.runtimes import served_forward

        forward = served_forward(model_file, os.cpu_count() or 1)
    else:
        eager = load_encoder(model_dir)
        forward = lambda ids, mask: eager(torch.from_numpy(ids), torch.from_numpy(mask))  # noqa: E731
    started, chunks_total = time.perf_counter(), 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_items), desc="raw forward", unit="batch"):
            chunks = split(tokenizer, texts[start:start + batch_items], max_length, overlap, max_chunks)
            for _, ids, mask in forward_passes(chunks, max_rows):
                forward(ids, mask)
            chunks_total += len(chunks.input_ids)
    return time.perf_counter() - started, chunks_total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=1000)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    settings, manifest = bench_stack(args.state_dir)
    data = beir.locate(args.data, settings.state_path)
    corpus = list(read_corpus(data / "corpus.jsonl"))
    random.Random(1).shuffle(corpus)
    items = corpus[:args.docs]
    path = settings.state_path / "bench" / f"ingest-{data.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    live = only_blue_live(manifest)
    if len(live) != 1:   # each item would be embedded once per live collection: not what the raw side does
        raise SystemExit(f"collections {live} take writes (a reindex or a switch's grace period): the job "
                         f"would embed every item {len(live)} times")
    with db.connect(manifest.postgres_dsn) as conn:
        blue = blue_green.get_blue(conn)

    served = model_file(version_dir(triton.model_repository(settings.state_path), ITEM_ENCODER, blue.model_version))
    # rows per forward as the job sends them (upsert.rows_per_request), as the reindex benchmark does
    raw_s, chunks = raw_forward([i["text"] for i in items], blue.source_dir, settings.upsert.batch_size,
                                settings.upsert.rows_per_request, blue.max_length, settings.model.chunk_overlap,
                                settings.model.max_chunks, served)
    started = time.perf_counter()
    status, logs = jobs.submit_and_wait(manifest, f"python -m es_ray.data.upsert --input {path}", echo_logs=False)
    wall_s = time.perf_counter() - started
    if status != "SUCCEEDED":
        raise SystemExit(f"upsert job {status}:\n{logs[-3000:]}")
    done = json.loads(re.search(r'\{[^\n]*"event": "upsert.done"[^\n]*\}', logs).group(0))
    job_s = float(done["seconds"])
    result = {
        "benchmark": "ingest", "docs": len(items), "chunks": chunks, "batch_size": settings.upsert.batch_size,
        "rows_per_request": settings.upsert.rows_per_request, "max_length": blue.max_length,
        "encoders": settings.upsert.encoders,
        "docs_per_s": round(len(items) / job_s, 2), "raw_docs_per_s": round(len(items) / raw_s, 2),
        "ratio": round(raw_s / job_s, 3), "job_s": round(job_s, 1), "job_wall_s": round(wall_s, 1),
        "raw_s": round(raw_s, 1), "raw_runtime": served.suffix.lstrip(".") if served else "eager torch",
        "raw_threads": os.cpu_count(), "served_threads": settings.model.torch_threads,
        "served_instances": settings.triton.item_instances, "live_collections": len(live),
        "note": "docs_per_s is measured inside the job (read -> embedded -> written, actor start-up included); "
                "job_wall_s adds submission and runtime-env set-up; blue is the only live collection (no dual writes)",
    }
    out = write_result("ingest", data.name, result, f"python -m es_ray.bench.ingest --docs {args.docs}")
    print(json.dumps(result, indent=2), f"\nwritten to {out}")  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
