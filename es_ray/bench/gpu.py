"""GPU check: the embedding stages of ingest and search on a CUDA torch, against the raw forward pass there.

    python -m es_ray.bench.gpu --prepare .gpu                               # here: what travels
    python -m es_ray.bench.gpu --data .gpu/scifact --model .gpu/model --out gpu.json   # where a CUDA torch is
    python -m es_ray.bench.gpu --record gpu.json                            # here: into bench/results

Issue 17 asks, where a session is lent a GPU machine, for ingest and search measured there with a CUDA
torch made on that machine (never the project's pins) as ratios to the raw forward pass on that GPU;
nothing depends on it. That machine has no Postgres, Triton or Ray, so what runs there is es-ray's own
encoding stage of each path in one process, the model in fp32 as Triton serves it:
- ingest: the texts in batches of upsert.batch_size, chunked at model.max_length (inference/chunking.py),
  rows sorted by length and upsert.rows_per_request to a forward pass, copied to the GPU and the vectors
  back to the host, by upsert.encoders threads that each take every n-th batch and have a tokenizer of
  their own (the upsert stage's actor pool; the Rust tokenizer and CUDA both release the GIL). Tokenising
  is inside the clock, as it is inside the job's;
- raw: the same forward passes over the same token ids already on the GPU, nothing else;
- one query: the search path's tokenising (tokenizer.rows_tokenizer, padded to model.query_pad_multiple as
  a production Triton's backends batch queries), the copies and the forward pass; raw: the forward pass
  of the same ids already on the GPU.
Every timing synchronises the GPU. Rounds interleave the two sides; each keeps its best round.

A device machine takes 64 MiB of files: --prepare writes the ingest benchmark's sample of the collection
(--docs documents, its queries and test judgements) and the model with fp16 weights (45 MB; widened back to
fp32 there: the same shapes and speed, vectors within fp16 rounding of the served ones). The config's
pydantic packages travel as wheels (`pip download` for Python 3.12), installed into a venv made there over
the machine's own CUDA torch.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_ray.config import load_settings
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.inference.chunking import forward_passes, split
from es_ray.inference.encoder import SentenceEncoder, load_encoder, load_tokenizer
from es_ray.inference.tokenizer import rows_tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ingest_path(encoder: SentenceEncoder, model_dir: Path, texts: list[str], batch_items: int, rows: int,
                model: Any, workers: int, device: torch.device) -> tuple[float, np.ndarray]:
    """Seconds from texts to vectors on the host, and the vectors (chunk rows in each batch's order)."""
    batches = [texts[start:start + batch_items] for start in range(0, len(texts), batch_items)]
    tokenizers = [load_tokenizer(model_dir) for _ in range(workers)]  # one each: settings change per call

    def embed(worker: int) -> list[tuple[int, np.ndarray]]:
        done = []
        for index in range(worker, len(batches), workers):
            chunks = split(tokenizers[worker], batches[index], model.max_length, model.chunk_overlap, model.max_chunks)
            vectors = None
            for picked, *arrays in forward_passes(chunks, rows):
                ids, mask = (torch.from_numpy(a).to(device) for a in arrays)
                with torch.inference_mode():
                    out = encoder(ids, mask).cpu().numpy()
                if vectors is None:
                    vectors = np.empty((len(chunks.input_ids), out.shape[1]), dtype=np.float32)
                vectors[picked] = out
            done.append((index, vectors))
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        per_worker = list(pool.map(embed, range(workers)))
    sync(device)
    seconds = time.perf_counter() - started
    by_batch = dict(pair for done in per_worker for pair in done)
    return seconds, np.concatenate([by_batch[i] for i in range(len(batches))])


def raw_inputs(model_dir: Path, texts: list[str], batch_items: int, rows: int, model: Any,
               device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ingest path's forward passes' inputs, tokenised and on the GPU before any clock starts."""
    tokenizer, inputs = load_tokenizer(model_dir), []
    for start in range(0, len(texts), batch_items):
        chunks = split(tokenizer, texts[start:start + batch_items], model.max_length, model.chunk_overlap,
                       model.max_chunks)
        inputs += [tuple(torch.from_numpy(a).to(device) for a in arrays) for _, *arrays in forward_passes(chunks, rows)]
    return inputs


def raw_forward(encoder: SentenceEncoder, inputs: list[tuple[torch.Tensor, torch.Tensor]],
                device: torch.device) -> float:
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in inputs:
            encoder(ids, mask)
    sync(device)
    return time.perf_counter() - started


def query_path(encoder: SentenceEncoder, tokenize, queries: list[str], device: torch.device) -> list[float]:
    """Seconds per query: tokenised, copied, embedded and copied back, one at a time."""
    seconds = []
    for query in queries:
        started = time.perf_counter()
        ids, mask = (torch.from_numpy(a).to(device) for a in tokenize([query]))
        with torch.inference_mode():
            encoder(ids, mask).cpu().numpy()
        seconds.append(time.perf_counter() - started)
    return seconds


def query_raw(encoder: SentenceEncoder, inputs: list[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device) -> list[float]:
    seconds = []
    with torch.inference_mode():
        for ids, mask in inputs:
            sync(device)
            started = time.perf_counter()
            encoder(ids, mask)
            sync(device)
            seconds.append(time.perf_counter() - started)
    return seconds


def measure(model_dir: Path, texts: list[str], queries: list[str], settings, device: torch.device,
            rounds: int = 3) -> dict[str, Any]:
    model, upsert = settings.model, settings.upsert
    # fp32, as Triton serves it; float() also widens weights that travelled as fp16 (--model's note)
    encoder = load_encoder(model_dir).float().to(device)
    workers = max(1, upsert.encoders)
    inputs = raw_inputs(model_dir, texts, upsert.batch_size, upsert.rows_per_request, model, device)
    tokenize = rows_tokenizer(model_dir, model.max_length, model.query_pad_multiple)
    query_inputs = [tuple(torch.from_numpy(a).to(device) for a in tokenize([q])) for q in queries]
    # warm-up: kernels chosen and memory cached for every shape the clocks will see
    raw_forward(encoder, inputs, device)
    query_raw(encoder, query_inputs[:20], device)
    path_s, raw_s, path_one_s, path_query, raw_query, vectors = [], [], [], [], [], None
    for _ in range(rounds):
        seconds, vectors = ingest_path(encoder, model_dir, texts, upsert.batch_size, upsert.rows_per_request,
                                       model, workers, device)
        path_s.append(seconds)
        path_one_s.append(ingest_path(encoder, model_dir, texts, upsert.batch_size, upsert.rows_per_request,
                                      model, 1, device)[0])
        raw_s.append(raw_forward(encoder, inputs, device))
        path_query.append(np.median(query_path(encoder, tokenize, queries, device)))
        raw_query.append(np.median(query_raw(encoder, query_inputs, device)))
    tokenizer = load_tokenizer(model_dir)
    started = time.perf_counter()
    for start in range(0, len(texts), upsert.batch_size):
        split(tokenizer, texts[start:start + upsert.batch_size], model.max_length, model.chunk_overlap, model.max_chunks)
    tokenise_s = time.perf_counter() - started
    # The path's vectors are the model's: the first batch's chunks through the encoder at once, unsorted
    first = split(tokenizer, texts[:upsert.batch_size], model.max_length, model.chunk_overlap, model.max_chunks)
    with torch.inference_mode():
        whole = encoder(*(torch.from_numpy(a).to(device) for a in (first.input_ids, first.attention_mask))).cpu().numpy()
    docs, best_path, best_raw = len(texts), min(path_s), min(raw_s)
    return {
        "benchmark": "gpu", "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": "float32",
        "docs": docs, "chunks": int(len(vectors)), "forward_passes": len(inputs), "queries": len(queries),
        "batch_size": upsert.batch_size, "rows_per_request": upsert.rows_per_request, "max_length": model.max_length,
        "workers": workers, "rounds": rounds,
        "ingest_docs_per_s": round(docs / best_path, 1), "ingest_one_worker_docs_per_s": round(docs / min(path_one_s), 1),
        "raw_docs_per_s": round(docs / best_raw, 1), "tokenise_docs_per_s": round(docs / tokenise_s, 1),
        "ingest_ratio": round(best_raw / best_path, 3),
        "query_p50_ms": round(min(path_query) * 1000, 3), "raw_query_p50_ms": round(min(raw_query) * 1000, 3),
        "query_ratio": round(min(path_query) / min(raw_query), 3),
        "rounds_s": {"ingest": [round(s, 3) for s in path_s], "ingest_one_worker": [round(s, 3) for s in path_one_s],
                     "raw": [round(s, 3) for s in raw_s]},
        "rounds_query_p50_ms": {"path": [round(s * 1000, 3) for s in path_query],
                                "raw": [round(s * 1000, 3) for s in raw_query]},
        "max_abs_difference": float(np.abs(vectors[:len(whole)] - whole).max()),
        "cpu_threads": torch.get_num_threads(),
    }


def prepare(folder: Path, data: Path | None, model_dir: Path | None, docs: int) -> None:
    """folder/<collection>: the sample the benchmark embeds (raw BEIR lines), the queries and the test
    judgements; folder/model: the encoder with fp16 weights and its tokenizer."""
    import shutil

    from es_ray.data import beir
    from es_ray.inference.encoder import resolve_model_dir

    settings = load_settings()
    data = beir.locate(data, settings.state_path)
    corpus = list(read_corpus(data / "corpus.jsonl"))
    random.Random(1).shuffle(corpus)
    keep = {item["id"] for item in corpus[:docs]}
    sample = folder / data.name
    (sample / "qrels").mkdir(parents=True, exist_ok=True)
    with open(data / "corpus.jsonl") as lines:   # the raw lines, as read_corpus reads them (ids as text)
        (sample / "corpus.jsonl").write_text("".join(line for line in lines
                                                     if line.strip() and str(json.loads(line)["_id"]) in keep))
    shutil.copy(data / "queries.jsonl", sample / "queries.jsonl")
    shutil.copy(data / "qrels" / "test.tsv", sample / "qrels" / "test.tsv")
    source = resolve_model_dir(model_dir or settings.model.source)
    load_encoder(source).transformer.half().save_pretrained(str(folder / "model"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, folder / "model" / name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    parser.add_argument("--model", type=Path, help="the encoder directory (the served model's weights; fp16 "
                                                   "weights are widened to fp32, for a copy small enough to carry)")
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="where the result is written (JSON)")
    parser.add_argument("--prepare", type=Path, help="write the collection's sample and the fp16 model here")
    parser.add_argument("--record", type=Path, help="a result measured elsewhere, written to bench/results here")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.data, args.model, args.docs)
        return
    if args.record:
        from es_ray.bench.common import write_result

        result = json.loads(args.record.read_text())
        command = result.pop("command", f"python -m es_ray.bench.gpu --docs {result['docs']} --rounds {result['rounds']}")
        print(write_result("gpu", result.pop("dataset"), result, command, machine_info=result.pop("machine")))  # noqa: T201
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark runs where a CUDA torch sees a GPU")
    settings = load_settings()
    corpus = list(read_corpus(args.data / "corpus.jsonl"))
    random.Random(1).shuffle(corpus)  # the ingest benchmark's sample
    texts = [item["text"] for item in corpus[:args.docs]]
    queries = read_queries(args.data / "queries.jsonl")
    test = [queries[q] for q in sorted(read_qrels(args.data / "qrels" / "test.tsv")) if q in queries]
    result = measure(args.model, texts, test, settings, torch.device("cuda"), args.rounds)
    from es_ray.stack.host import machine

    result |= {"dataset": args.data.name, "machine": {**machine(), "gpu": result["gpu"]},
               "command": "python -m es_ray.bench.gpu " + " ".join(sys.argv[1:] if argv is None else argv)}
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)  # noqa: T201 - the benchmark's report


if __name__ == "__main__":
    main()
