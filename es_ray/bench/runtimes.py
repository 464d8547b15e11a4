"""Runtimes benchmark: the same MiniLM in eager torch, TorchScript, ONNX Runtime and ONNX Runtime int8.

    python -m es_ray.bench.runtimes --data ../shared/data/scifact [--ndcg torch,onnx,onnx-int8]

What Triton can run decides how close a search or a reindex gets to the model's own speed, so each
runtime runs the same SciFact inputs, one after the other in one run, with 2 threads:
- ingest: batches of upsert.batch_size texts, chunked at model.max_length, rows sorted by length and
  sent triton.max_batch_size at a time (what the upsert job does);
- reindex: batches of reindex.batch_size texts, reindex.rows_per_request rows at a time;
- one query: test queries one by one, padded as the search path pads them (triton_client.query_padding).
Tokenising and chunking is the same for every runtime and done before the clocks start.
torchscript is `encoder.trace` (what the python backend serves with model.runtime torchscript), onnx is
`encoder.export_onnx` run by ONNX Runtime with every graph optimisation, onnx-int8 its dynamic int8
quantisation (onnxruntime.quantization). Each runtime's vectors are compared with eager torch's (cosine).
With --ndcg, each named runtime embeds the whole collection (minutes each on 2 cores; cached per
runtime under ~/.cache/es-ray) and the test queries: nDCG@10, exact ranking, as search ranks (best chunk).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from es_ray.bench.common import percentiles, write_result
from es_ray.bench.corpus_vectors import Encode, collection_vectors
from es_ray.config import load_settings
from es_ray.data import beir
from es_ray.data.corpus import read_corpus, read_qrels, read_queries
from es_ray.inference.chunking import forward_passes, split
from es_ray.inference.encoder import (INPUT_NAMES, default_model_dir, export_onnx, load_encoder, load_tokenizer,
                                      trace)
from es_ray.inference.triton_client import query_padding
from es_ray.train.evaluation import evaluate

RUNTIMES = ("torch", "torchscript", "onnx", "onnx-int8")


def onnx_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """What the python backend builds from model.onnx: every graph optimisation, `threads` intra-op threads;
    its pool spins as ONNX Runtime's default has it (the stub stops the spinning after each run, which
    costs nothing back to back: BENCHMARKS.md, "A lone query on both cores")."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def served_forward(path: Path, threads: int) -> Encode:
    """(ids, mask) -> vectors for a model file as Triton serves it: model.onnx in ONNX Runtime (built as the
    python backend builds it), model.pt in TorchScript; at `threads` threads."""
    if path.suffix == ".onnx":
        session = onnx_session(path, threads)
        return lambda ids, mask: session.run(None, dict(zip(INPUT_NAMES, (ids, mask))))[0]
    model = torch.jit.load(str(path)).eval()

    def call(ids, mask):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        finally:
            torch.set_num_threads(previous)
    return call


def encoders(model_dir: Path, folder: Path, threads: int) -> dict[str, Encode]:
    """runtime name -> (ids, mask) -> vectors."""
    torch.set_num_threads(threads)
    eager = load_encoder(model_dir)
    traced = trace(eager)
    fp32, int8 = folder / "model.onnx", folder / "model-int8.onnx"
    export_onnx(eager, fp32)
    # Weights to int8, activations quantised on the fly: no calibration data needed. The served graph is
    # not optimised (constants and shapes unfolded): ONNX Runtime's pre-processing folds it first, as its
    # quantisation guide says.
    folded = folder / "model-folded.onnx"
    quant_pre_process(str(fp32), str(folded), skip_symbolic_shape=True)
    quantize_dynamic(str(folded), str(int8), weight_type=QuantType.QInt8)

    def torch_call(module) -> Encode:
        def call(ids, mask):
            with torch.inference_mode():
                return module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        return call

    def onnx_call(session: onnxruntime.InferenceSession) -> Encode:
        return lambda ids, mask: session.run(None, dict(zip(INPUT_NAMES, (ids, mask))))[0]

    return {"torch": torch_call(eager), "torchscript": torch_call(traced),
            "onnx": onnx_call(onnx_session(fp32, threads)), "onnx-int8": onnx_call(onnx_session(int8, threads))}


def batches(tokenizer, texts: list[str], batch_texts: int, rows: int, settings) -> list[tuple[np.ndarray, np.ndarray]]:
    """The requests a pipeline sends for `texts`: chunked per batch of texts, longest rows first, `rows` a request,
    each as wide as its longest row."""
    model = settings.model
    out = []
    for start in range(0, len(texts), batch_texts):
        chunks = split(tokenizer, texts[start:start + batch_texts], model.max_length, model.chunk_overlap,
                       model.max_chunks)
        out += [(ids, mask) for _, ids, mask in forward_passes(chunks, rows)]
    return out


def query_inputs(tokenizer, queries: list[str], settings) -> list[tuple[np.ndarray, np.ndarray]]:
    """One request per query, padded as the search path pads it (es_ray/inference/triton_client.py)."""
    encoded = [tokenizer([q], max_length=settings.model.max_length, truncation=True, padding=True,
                         pad_to_multiple_of=query_padding(settings), return_tensors="np") for q in queries]
    return [(e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)) for e in encoded]


def run_all(encode: Encode, requests: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, np.ndarray]:
    encode(*requests[0])  # warm-up: the first call allocates
    started = time.perf_counter()
    vectors = [encode(ids, mask) for ids, mask in requests]
    return time.perf_counter() - started, np.concatenate(vectors)


def query_latencies(encode: Encode, requests: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[float], np.ndarray]:
    encode(*requests[0])
    seconds, vectors = [], []
    for ids, mask in requests:
        started = time.perf_counter()
        vectors.append(encode(ids, mask))
        seconds.append(time.perf_counter() - started)
    return seconds, np.concatenate(vectors)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def ndcg_at_10(data: Path, model_dir: Path, runtime: str, encode: Encode, settings, tokenizer) -> float:
    """nDCG@10 of SciFact's judged test queries over the whole collection, every vector from `runtime`."""
    model = settings.model
    items = collection_vectors(data, model_dir, model.max_length, model.chunk_overlap, model.max_chunks,
                               encode=None if runtime == "torch" else encode,
                               runtime="" if runtime == "torch" else runtime)
    queries, qrels = read_queries(data / "queries.jsonl"), read_qrels(data / "qrels" / "test.tsv")
    ids = sorted(q for q, docs in qrels.items() if q in queries and any(g > 0 for g in docs.values()))
    _, vectors = query_latencies(encode, query_inputs(tokenizer, [queries[q] for q in ids], settings))
    return round(evaluate(items.rank(vectors, ids, k=100), qrels)["ndcg@10"], 4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="BEIR directory (default ../shared/data/scifact)")
    parser.add_argument("--docs", type=int, default=256, help="documents timed per batch shape")
    parser.add_argument("--queries", type=int, default=100, help="single queries timed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every runtime; medians reported")
    parser.add_argument("--ndcg", default="", help=f"comma-separated runtimes ({', '.join(RUNTIMES)}) whose "
                                                   "test nDCG@10 is measured over the whole collection")
    parser.add_argument("--scratch", default="", help="write /tmp/esr-bench-scratch/... instead of bench/results")
    args = parser.parse_args(argv)
    ndcg_runtimes = [r for r in args.ndcg.split(",") if r]
    if unknown := set(ndcg_runtimes) - set(RUNTIMES):
        parser.error(f"unknown runtimes {sorted(unknown)}; known: {', '.join(RUNTIMES)}")

    settings = load_settings()
    data = beir.locate(args.data, settings.state_path)
    model_dir = Path(settings.model.source) if settings.model.source else default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    corpus = list(read_corpus(data / "corpus.jsonl"))
    random.Random(1).shuffle(corpus)  # the sample the ingest benchmark takes
    texts = [item["text"] for item in corpus[:args.docs]]
    queries = read_queries(data / "queries.jsonl")
    test_ids = sorted(read_qrels(data / "qrels" / "test.tsv"))[:args.queries]
    shapes = {
        "ingest": batches(tokenizer, texts, settings.upsert.batch_size, settings.triton.max_batch_size, settings),
        "reindex": batches(tokenizer, texts, settings.reindex.batch_size, settings.reindex.rows_per_request, settings),
    }
    query_requests = query_inputs(tokenizer, [queries[q] for q in test_ids if q in queries], settings)

    with tempfile.TemporaryDirectory(prefix="esr-runtimes-") as folder:
        started = time.perf_counter()
        runtimes = encoders(model_dir, Path(folder), args.threads)
        prepare_s = time.perf_counter() - started
        onnx_mb = {name: round((Path(folder) / f).stat().st_size / 2**20, 1)
                   for name, f in (("onnx", "model.onnx"), ("onnx-int8", "model-int8.onnx"))}
        # Rounds interleave the runtimes, so a burst of other work on the machine slows each runtime in
        # some round rather than one runtime throughout; the medians over rounds are compared.
        rows = {name: {"runtime": name, "file_mb": onnx_mb.get(name, ""), "rounds": []} for name in runtimes}
        reference: dict[str, np.ndarray] = {}
        for round_number in range(args.rounds):
            for name, encode in runtimes.items():
                measured: dict = {}
                for shape, requests in shapes.items():
                    seconds, vectors = run_all(encode, requests)
                    measured[f"{shape}_docs_per_s"] = round(len(texts) / seconds, 2)
                    reference.setdefault(shape, vectors)  # eager torch runs first: the reference
                    rows[name][f"cosine_{shape}_min"] = round(float(cosines(vectors, reference[shape]).min()), 6)
                latencies, vectors = query_latencies(encode, query_requests)
                reference.setdefault("query", vectors)
                measured["query"] = percentiles(latencies)
                rows[name]["cosine_queries_min"] = round(float(cosines(vectors, reference["query"]).min()), 6)
                rows[name]["rounds"].append(measured)
                print(round_number, name, measured, flush=True)
        for row in rows.values():
            for key in ("ingest_docs_per_s", "reindex_docs_per_s"):
                row[key] = round(float(np.median([r[key] for r in row["rounds"]])), 2)
            row["query_p50_ms"] = round(float(np.median([r["query"]["p50_ms"] for r in row["rounds"]])), 2)
            row["cosine_docs_min"] = min(row["cosine_ingest_min"], row["cosine_reindex_min"])
        torchscript = rows["torchscript"]
        for row in rows.values():  # speed against what Triton served before, measured in this run
            row["ingest_vs_torchscript"] = round(row["ingest_docs_per_s"] / torchscript["ingest_docs_per_s"], 2)
            row["reindex_vs_torchscript"] = round(row["reindex_docs_per_s"] / torchscript["reindex_docs_per_s"], 2)
            row["query_vs_torchscript"] = round(torchscript["query_p50_ms"] / row["query_p50_ms"], 2)
        for name in ndcg_runtimes:
            started = time.perf_counter()
            row = rows[name]
            row["test_ndcg@10"] = ndcg_at_10(data, model_dir, name, runtimes[name], settings, tokenizer)
            print(name, "nDCG@10", row["test_ndcg@10"], f"{time.perf_counter() - started:.0f} s", flush=True)

    result = {
        "benchmark": "runtimes", "docs": len(texts), "queries": len(query_requests), "threads": args.threads,
        "max_length": settings.model.max_length, "ingest_batch": settings.upsert.batch_size,
        "ingest_rows": settings.triton.max_batch_size, "reindex_batch": settings.reindex.batch_size,
        "reindex_rows": settings.reindex.rows_per_request, "query_pad_multiple": query_padding(settings),
        "chunks": {shape: int(sum(len(ids) for ids, _ in requests)) for shape, requests in shapes.items()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "exporter": "torch.onnx.export(dynamo=True)", "prepare_s": round(prepare_s, 1),
        "rounds": args.rounds, "runtimes": list(rows.values()),
    }
    command = (f"python -m es_ray.bench.runtimes --docs {args.docs} --queries {args.queries} --rounds {args.rounds}"
               + (f" --data {args.data}" if args.data else "") + (f" --ndcg {args.ndcg}" if args.ndcg else ""))
    print(write_result("runtimes", data.name, result, command, scratch=args.scratch))


if __name__ == "__main__":
    main()
