"""Triton python-backend model that serves a sentence encoder from an ONNX or a TorchScript file.

Generated into every version directory of the es-ray model repository next to the model file that
config.pbtxt's `model_filename` names: model.onnx runs in ONNX Runtime, model.pt in torch. A production
Triton serves the same files with its own onnxruntime or libtorch backend (config.pbtxt switches).
Inputs are token ids and attention mask (INT64, [batch, seq]); the output is the L2-normalised
embedding (FP32, [batch, dim]).
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # The stub runs the base interpreter: make the project's virtual environment importable.
        for path in params.get("python_path", "").split(os.pathsep):
            if path and path not in sys.path:
                sys.path.insert(0, path)
        import numpy as np

        self.np = np
        threads = int(params.get("torch_threads", "0"))  # 0: the runtime's default (every core)
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_filename", "model.pt"))
        if path.endswith(".onnx"):
            self.run = self._onnx(path, threads, int(params.get("lone_request_threads", "0")),
                                  int(params.get("arena_shrink_above_tokens", "0")),
                                  float(params.get("arena_shrink_idle_s", "0")))
        else:
            run = self._torchscript(path, threads, args)
            self.run = lambda ids, mask, alone: run(ids, mask)  # torch: one thread setting per process

    def _onnx(self, path, threads, lone_threads, shrink_above_tokens, shrink_idle_s):
        # torch is never imported here: a stub that runs ONNX Runtime alone is hundreds of MB smaller.
        import threading
        import time

        import onnxruntime

        np = self.np

        def session_with(intra_op_threads):
            options = onnxruntime.SessionOptions()
            options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = intra_op_threads
            options.inter_op_num_threads = 1
            # The pool's threads spin while a run hands work between them (waking a sleeping thread for
            # each of a query's ~100 parallel sections is what made two threads no faster than one), and
            # stop when the run returns: left spinning, they burned a core between requests.
            options.add_session_config_entry("session.force_spinning_stop", "1")
            return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        session = session_with(threads)
        # A lone one-row request (Triton found nothing else in this model's queue: a search's query at low
        # load) runs on lone_threads threads, where they make it faster; a batch, or a request of many rows
        # (background work: the improvement loop's queries), runs on `threads`, where more threads would
        # take the cores from the rest of the stack (BENCHMARKS.md, "A lone query on both cores"). A second
        # session of the same file costs about its weights' size in memory, so there is one only where it
        # has more threads than the first (threads 0: ONNX Runtime's default, every core already).
        lone = session_with(lone_threads) if threads and lone_threads > threads else session
        names = [i.name for i in session.get_inputs()]
        # The memory arena keeps allocations between runs, but left alone it also keeps its peak for
        # good: an item encoder that embedded batches of 64 x 256 tokens held 1.1 GB while idle. Shrinking
        # it gives that back (BENCHMARKS.md, "Idle stack"), at a cost: the next run allocates and faults
        # its pages in again, 7.5 % more CPU per run at 16 x 40 tokens (a reindex request) and 5-7.6 % at
        # 16 x 256 (an ingest request). So only a run of more than arena_shrink_above_tokens tokens asks
        # for a shrink (smaller runs keep an arena no larger than their own peak, about 40 MB above the
        # loaded session at 16 x 64), and the shrink waits until the stub has run nothing for
        # arena_shrink_idle_s: during bulk work the next large run reuses the arena, and once the work
        # stops a one-token run with the shrink option gives it back (0: shrink at the end of the large
        # run itself). ONNX Runtime's sessions are thread-safe: a request that arrives meanwhile runs beside
        # the shrink, which frees only memory no run holds.
        shrink = onnxruntime.RunOptions()
        shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        if shrink_idle_s <= 0:
            return lambda ids, mask, alone: (lone if alone else session).run(
                None, dict(zip(names, (ids, mask))), shrink if ids.size > shrink_above_tokens else None)[0]
        state = {"running": 0, "last_end": 0.0, "pending": False}
        changed = threading.Condition()
        one_token = dict(zip(names, (np.zeros((1, 1), dtype=np.int64), np.ones((1, 1), dtype=np.int64))))

        def shrink_when_idle():
            while True:
                with changed:
                    while not state["pending"]:
                        changed.wait()
                    while state["running"] or time.monotonic() < state["last_end"] + shrink_idle_s:
                        changed.wait(None if state["running"] else state["last_end"] + shrink_idle_s - time.monotonic())
                    state["pending"] = False
                for each in [session] if lone is session else [session, lone]:
                    each.run(None, one_token, shrink)

        threading.Thread(target=shrink_when_idle, name="arena-shrink", daemon=True).start()

        def run(ids, mask, alone):
            with changed:
                state["running"] += 1
            try:
                return (lone if alone else session).run(None, dict(zip(names, (ids, mask))))[0]
            finally:
                with changed:
                    state["running"] -= 1
                    state["last_end"] = time.monotonic()
                    state["pending"] = state["pending"] or ids.size > shrink_above_tokens
                    if state["pending"]:  # else the shrinker sleeps until a large run: waking it costs a query
                        changed.notify()  # a thread switch, for nothing

        return run

    def _torchscript(self, path, threads, args):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        use_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        device = torch.device(f"cuda:{args['model_instance_device_id']}" if use_gpu else "cpu")
        model = torch.jit.load(path, map_location=device).eval()

        def run(ids, mask):
            with torch.inference_mode():
                return model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)).float().cpu().numpy()
        return run

    def execute(self, requests):
        np = self.np
        ids = [pb_utils.get_input_tensor_by_name(r, "input_ids__0").as_numpy() for r in requests]
        masks = [pb_utils.get_input_tensor_by_name(r, "attention_mask__1").as_numpy() for r in requests]
        # Dynamic batching hands over several requests: pad them to one length and run the model once
        # (a lone request, a query at 1 client, goes as it came: no copy).
        if len(requests) == 1:
            padded_ids, padded_mask = ids[0], masks[0]
        else:
            width = max(a.shape[1] for a in ids)
            padded_ids = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in ids])
            padded_mask = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in masks])
        out = self.run(padded_ids.astype(np.int64, copy=False), padded_mask.astype(np.int64, copy=False),
                       len(requests) == 1 and padded_ids.shape[0] == 1)
        responses, start = [], 0
        for a in ids:
            rows = out[start:start + a.shape[0]]
            start += a.shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding__0", rows)]))
        return responses
