"""A small fine-tune on a tiny encoder and a few hundred synthetic sessions, through Ray Tune, Ray
Train and MLflow end to end (on the session's Ray cluster, with an MLflow store of its own)."""

import random
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest
import torch

from es_ray.config import load_settings
from es_ray.inference import registry
from es_ray.inference.encoder import load_encoder, load_tokenizer
from es_ray.stack import ray_head
from es_ray.store.clickstream import LoggedSession
from es_ray.train.clicklog import SessionBatch
from es_ray.train.config import load_finetune_config
from es_ray.train.finetune import EXPERIMENT, ParentModel, fine_tune
from es_ray.train.item_vectors import ItemVectors
from es_ray.inference.encoder import QUERY_TOWER_DIR
from es_ray.train.trainer import embed_queries
from tests.tiny_model import tiny_encoder_dir

TOPICS = ["volcano", "glacier", "protein", "galaxy", "river", "vaccine", "neuron", "crystal", "desert", "forest"]


def synthetic_log(rng: random.Random, sessions: int = 300):
    """Queries about a topic, each with one relevant item among ten shown; position-biased clicks."""
    items = {f"{t}-{k}": f"{t} study number {k}" for t in TOPICS for k in range(6)}
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    log = []
    for n in range(sessions):
        topic, k = rng.choice(TOPICS), rng.randrange(6)
        query = f"what about {topic} {k}"
        shown = [f"{topic}-{k}"] + rng.sample([i for i in items if i != f"{topic}-{k}"], 9)
        rng.shuffle(shown)
        clicked = {d for r, d in enumerate(shown) if rng.random() < (0.8 / (r + 1)) * (0.9 if d == f"{topic}-{k}" else 0.1)}
        log.append(LoggedSession(f"s{n}", query, False, start + timedelta(seconds=n),
                                 [(r + 1, d) for r, d in enumerate(shown)], clicked))
    return items, log


@pytest.fixture(scope="module")
def ray_cluster(stack, settings):
    import ray

    ray.init(address=stack.ray_address, namespace=settings.ray.namespace, logging_level="warning",
             log_to_driver=False)
    yield
    # Tune registers its trainables in the cluster's KV store and an atexit hook to delete them; at
    # pytest's exit the cluster is gone and that hook would reconnect and wait on it. Delete them now.
    import atexit

    from ray.tune import registry

    registry._unregister_all()
    atexit.unregister(registry._unregister_all)
    ray.shutdown()


class TrainWorkerNiceness:
    """Samples, while a fine-tune runs, the nice value of every thread of each Ray Train worker process
    of this stack (its title starts with ray::RayTrainWorker, its RAY_TMPDIR is the stack's); keeps each
    worker's last sample."""

    def __init__(self, state_dir: str):
        self.marker = str(ray_head.temp_dir(Path(state_dir)))
        self.last: dict[int, list[int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            for process in psutil.process_iter(["pid", "cmdline", "environ"]):
                if ((process.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")
                        and (process.info["environ"] or {}).get("RAY_TMPDIR") == self.marker):
                    try:
                        self.last[process.pid] = [int((t / "stat").read_text().rsplit(")", 1)[1].split()[16])
                                                  for t in Path(f"/proc/{process.pid}/task").iterdir()]
                    except (OSError, IndexError):
                        continue  # the worker ended meanwhile

    def __enter__(self) -> "TrainWorkerNiceness":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def test_tiny_finetune_runs_through_tune_and_mlflow(ray_cluster, stack, tmp_path):
    settings = load_settings(tmp_path / "state")       # an MLflow store of its own
    parent_dir = tiny_encoder_dir(tmp_path / "tiny")
    items, log = synthetic_log(random.Random(5))
    encoder, tokenizer = load_encoder(parent_dir), load_tokenizer(parent_dir)
    with torch.no_grad():
        vectors = embed_queries(encoder, tokenizer, list(items.values()), 32, "cpu").numpy()
    item_vectors = ItemVectors.from_chunks({i: [(1, v)] for i, v in zip(items, vectors)})
    config = load_finetune_config(overrides={
        "data": {"min_heldout_queries": 2}, "debias": {"propensity": "config"},
        "train": {"max_steps": 6, "eval_every_steps": 2},
        "tune": {"num_samples": 2, "max_concurrent_trials": 2, "cpus_per_trial": 0.5, "grace_period": 1},
        "space": {"epochs": {"choice": [1, 2]}, "batch_size": {"choice": [16]}},
        "trial": {"epochs": 1, "batch_size": 16},
        "gate": {"margin": 1.0}})                      # no model can beat blue by 1.0: the gate must refuse
    progress = []
    with TrainWorkerNiceness(stack.state_dir) as workers:
        result = fine_tune(settings, config, SessionBatch(log), item_vectors, items, ParentModel(1, parent_dir, 32, 128),
                           progress.append)

    # serving before batch work: each trial's training worker ran at ray.batch_nice, every one of its threads
    assert settings.ray.batch_nice > 0 and workers.last, "no Ray Train worker was seen"
    assert {pid: set(nice) for pid, nice in workers.last.items()} == {pid: {settings.ray.batch_nice}
                                                                      for pid in workers.last}

    assert len(result["trials"]) == 2 and all(t["status"] in {"completed", "stopped"} for t in result["trials"])
    assert result["tune_wall_s"] > 0 and result["ideal_wall_s"] > 0
    assert {p["stage"] for p in progress} >= {"preparing data", "tuning", "registering"}
    assert any(p.get("trials_done") == 2 for p in progress)
    # the gate refused, and the version is registered all the same, with both scores and its lineage
    assert result["candidate"] is False and "does not beat" in result["gate"]["reason"]
    assert result["gate"]["blue"] == pytest.approx(result["blue_heldout"]["ndcg@10"], abs=1e-6)
    client = registry.client(registry.tracking_uri(settings))
    version = client.get_model_version(settings.mlflow.registered_model, str(result["version"]))
    tags = version.tags
    assert tags["es_ray.parent_version"] == "1" and tags["es_ray.split_seed"] == "13"
    assert tags["es_ray.sessions"] == "300" and tags["es_ray.gate"] == "rejected"
    assert float(tags["es_ray.heldout.ndcg_at_10"]) == pytest.approx(result["heldout"]["ndcg@10"], abs=1e-5)
    # every trial is a child run with its hyperparameters and curves
    experiment = client.get_experiment_by_name(EXPERIMENT)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert len(children) == 2
    for child in children:
        assert {"learning_rate", "frozen_layers", "scale", "epochs", "batch_size"} <= set(child.data.params)
        assert child.info.status in {"FINISHED", "KILLED"}
        assert len(client.get_metric_history(child.info.run_id, "ndcg_at_10")) >= 1
    # the registered directory has the trained query tower beside the parent's item tower
    model_dir = registry.download(settings, result["version"])
    assert (model_dir / QUERY_TOWER_DIR / "config.json").exists() and (model_dir / "config.json").exists()
    trained = load_encoder(model_dir / QUERY_TOWER_DIR)
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), encoder.state_dict().values())]
    assert any(changed)


def test_repository_entry_holds_two_towers_or_one_shared_file(tmp_path):
    from es_ray.config import TritonSettings
    from es_ray.inference import triton_repo
    from es_ray.inference.encoder import trace

    parent_dir = tiny_encoder_dir(tmp_path / "tiny", seed=0)
    other_dir = tiny_encoder_dir(tmp_path / "tiny-other", seed=1)
    item, query = trace(load_encoder(parent_dir)), trace(load_encoder(other_dir))
    repo = tmp_path / "repo"
    triton_repo.write_version(repo, 1, {"query_encoder": item, "item_encoder": item}, 32, TritonSettings())
    triton_repo.write_version(repo, 2, {"query_encoder": query, "item_encoder": item}, 32, TritonSettings())
    shared = [(triton_repo.version_dir(repo, name, 1) / "model.pt").stat().st_ino for name in triton_repo.ENCODERS]
    assert shared[0] == shared[1]                                   # one file on disk, hard-linked
    assert sorted(triton_repo.deployed_versions(repo).items()) == [
        ("item_encoder_v1", 1), ("item_encoder_v2", 2), ("query_encoder_v1", 1), ("query_encoder_v2", 2)]
    assert 'name: "query_encoder_v2"' in (repo / "query_encoder_v2" / "config.pbtxt").read_text()
    two = [torch.jit.load(str(triton_repo.version_dir(repo, name, 2) / "model.pt"))
           for name in ("query_encoder", "item_encoder")]
    ids, mask = torch.randint(100, 1000, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    with torch.no_grad():
        assert not torch.allclose(two[0](ids, mask), two[1](ids, mask))
        assert torch.allclose(two[0](ids, mask), query(ids, mask))
