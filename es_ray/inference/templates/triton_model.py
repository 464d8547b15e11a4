"""Triton python-backend model that serves a TorchScript sentence encoder.

Generated into every version directory of the es-ray model repository next to model.pt. The same
model.pt is served by Triton's libtorch backend in production (config.pbtxt switches the backend).
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
        import torch

        self.np, self.torch = np, torch
        threads = int(params.get("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        use_gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if use_gpu else "cpu")
        path = os.path.join(args["model_repository"], args["model_version"], "model.pt")
        self.model = torch.jit.load(path, map_location=self.device).eval()

    def execute(self, requests):
        np, torch = self.np, self.torch
        ids = [pb_utils.get_input_tensor_by_name(r, "input_ids__0").as_numpy() for r in requests]
        masks = [pb_utils.get_input_tensor_by_name(r, "attention_mask__1").as_numpy() for r in requests]
        # Dynamic batching hands over several requests: pad them to one length and run the model once.
        width = max(a.shape[1] for a in ids)
        padded_ids = np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in ids])
        padded_mask = np.concatenate([np.pad(m, ((0, 0), (0, width - m.shape[1]))) for m in masks])
        with torch.inference_mode():
            out = self.model(torch.from_numpy(padded_ids).to(self.device),
                             torch.from_numpy(padded_mask).to(self.device)).float().cpu().numpy()
        responses, start = [], 0
        for a in ids:
            rows = out[start:start + a.shape[0]]
            start += a.shape[0]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("embedding__0", rows)]))
        return responses
