"""Writing a model version's Triton repository files in a child process.

Exporting loads the model and, for ONNX, torch's exporter; much of that memory stays with the process
that did it (measured here for all-MiniLM-L6-v2: RSS 583 MB after an ONNX export against 407 MB after
tracing, peak 1 GB). The lifecycle driver, which deploys, lives as long as the stack: a child process
exports and takes all of it with it when it exits.

    python -m es_ray.inference.export '{"repo": ..., "version": ..., "model_dir": ..., ...}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import es_ray
from es_ray.config import TritonSettings

TIMEOUT_S = 600  # an ONNX export of MiniLM takes about 10 s on 2 cores; a larger encoder takes longer


def write_version(repo: Path, version: int, model_dir: Path, dim: int, triton: TritonSettings, torch_threads: int,
                  runtime: str, nice: int = 0, lone_query_threads: int = 0) -> dict[str, str]:
    """Both encoders of `version` written into `repo` as `runtime`'s files, by a child process running at
    niceness `nice` (an export is batch work: it must not take the cores from the servers carrying traffic).
    Returns {Triton model name: how its file was made} (triton_repo.write_version)."""
    request = {"repo": str(repo), "version": version, "model_dir": str(model_dir), "dim": dim,
               "triton": triton.model_dump(), "torch_threads": torch_threads, "runtime": runtime, "nice": nice,
               "lone_query_threads": lone_query_threads}
    env = dict(os.environ)  # the child imports this es_ray, wherever it was imported from
    package_root = str(Path(es_ray.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-m", "es_ray.inference.export", json.dumps(request)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"exporting version {version} ({runtime}) failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write(request: dict) -> dict[str, str]:
    from es_ray.inference import triton_repo
    from es_ray.inference.encoder import load_encoder, query_tower_dir

    model_dir = Path(request["model_dir"])
    item_tower = load_encoder(model_dir)
    query_dir = query_tower_dir(model_dir)
    query_tower = item_tower if query_dir == model_dir else load_encoder(query_dir)
    return triton_repo.write_version(Path(request["repo"]), request["version"],
                                     {triton_repo.QUERY_ENCODER: query_tower, triton_repo.ITEM_ENCODER: item_tower},
                                     request["dim"], TritonSettings(**request["triton"]), request["torch_threads"],
                                     request["runtime"], request.get("lone_query_threads", 0))


if __name__ == "__main__":
    from es_ray.priority import run_as_batch

    arguments = json.loads(sys.argv[1])
    run_as_batch(arguments.get("nice", 0))
    print(json.dumps(_write(arguments)))  # the last line of stdout: the parent's answer
