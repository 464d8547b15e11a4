"""One trial's training: the Ray Train worker loop that fine-tunes the query tower.

Each step embeds a batch of queries with the trainable encoder and scores them against fixed item
vectors (the clicked item's best chunk, a mined hard negative, and every other example's items in
the batch) with sentence-transformers' MultipleNegativesRankingLoss. Every `eval_every_steps` the
worker ranks the held-out queries exactly over the item vectors, reports nDCG@10 / MRR@10 /
Recall@100 to Ray Train (and through it to Tune, whose ASHA scheduler may stop the trial), logs
them to the trial's MLflow run, and saves a checkpoint when the tuned metric improved.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_ray.inference.encoder import QUERY_TOWER_DIR, SentenceEncoder, load_encoder, load_tokenizer
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.metrics import evaluate



@dataclass
class TrainingData:
    """Everything a trial needs, put in the object store once and shared by all trials."""

    queries: list[str]
    positive_ids: list[str]
    positives: np.ndarray          # (n, dim) the clicked item's best chunk for the query
    negatives: np.ndarray          # (n, dim) a mined hard negative (or a random item) for the query
    weights: np.ndarray            # (n,) sampling weights
    heldout_queries: dict[str, str]
    heldout_qrels: dict[str, dict[str, int]]
    heldout_judged: dict[str, list[str]]    # per held-out query, the items its sessions showed
    items: ItemVectors
    parent_dir: str
    max_query_length: int
    epoch_size: int                # examples per epoch: the clicks the examples came from, whatever the method


def freeze_bottom_layers(transformer: torch.nn.Module, layers: int) -> int:
    """Freezes the embeddings and the first `layers` transformer layers (BERT-style encoders); the top
    layer always stays trainable. Returns how many layers were frozen."""
    if layers <= 0:
        return 0
    encoder_layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    embeddings = getattr(transformer, "embeddings", None)
    if encoder_layers is None or embeddings is None:
        raise ValueError(f"frozen_layers needs a BERT-style encoder (embeddings + encoder.layer); "
                         f"{type(transformer).__name__} has neither")
    layers = min(layers, len(encoder_layers) - 1)
    for module in [embeddings, *list(encoder_layers)[:layers]]:
        for parameter in module.parameters():
            parameter.requires_grad = False
    return layers


def embed_queries(model: SentenceEncoder, tokenizer, texts: list[str], max_length: int, device,
                  batch_size: int = 128) -> torch.Tensor:
    out = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start:start + batch_size], max_length=max_length, truncation=True, padding=True,
                            return_tensors="pt")
        out.append(model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device)))
    return torch.cat(out) if out else torch.zeros((0, 0))


def heldout_metrics(model: SentenceEncoder, tokenizer, data: TrainingData, device) -> dict[str, float]:
    """Held-out queries ranked exactly over the item vectors, scored with trec_eval.

    Click labels exist only for what the blue model showed: an item it never showed for a query was
    never judged. nDCG@10 and MRR@10 are therefore computed on condensed lists (Sakai, "Alternatives
    to Bpref", SIGIR 2007): each model's ranking of the judged (shown) items only, so a model is not
    punished for surfacing items nobody could click. Recall@100 is over the whole item set.
    """
    was_training = model.training
    model.eval()
    qids = sorted(data.heldout_queries)
    with torch.no_grad():
        vectors = embed_queries(model, tokenizer, [data.heldout_queries[q] for q in qids], data.max_query_length,
                                device).float().cpu().numpy()
    model.train(was_training)
    index = data.items.index()
    condensed = {}
    for start in range(0, len(qids), 256):
        scores = data.items.item_scores(vectors[start:start + 256])
        for row, qid in enumerate(qids[start:start + 256]):
            condensed[qid] = {item: float(scores[row, index[item]]) for item in data.heldout_judged[qid]}
    on_judged = evaluate(condensed, data.heldout_qrels)
    overall = evaluate(data.items.rank(vectors, qids, k=100), data.heldout_qrels)
    return {"ndcg@10": on_judged["ndcg@10"], "mrr@10": on_judged["mrr@10"], "recall@100": overall["recall@100"]}


def sample_batch(rng: np.random.Generator, weights: np.ndarray, positive_ids: list[str], size: int) -> np.ndarray:
    """A batch drawn in proportion to the weights, with no item twice as a positive (it would be a
    false in-batch negative for the other query)."""
    drawn = rng.choice(len(weights), size=min(len(weights), 3 * size), p=weights / weights.sum())
    seen, batch = set(), []
    for i in drawn:
        if positive_ids[i] not in seen:
            seen.add(positive_ids[i])
            batch.append(i)
            if len(batch) == size:
                break
    return np.asarray(batch)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: the trial's hyperparameters plus `data` (an object ref to
    TrainingData), `tuned_metric`, `max_steps`, `eval_every_steps`, `warmup_ratio`, `weight_decay`,
    `seed` and `mlflow` (where to log this trial)."""
    import ray
    import ray.train
    import ray.train.torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import get_linear_schedule_with_warmup

    data: TrainingData = ray.get(config["data"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed = int(config["seed"]) + rank
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    encoder = load_encoder(data.parent_dir)
    encoder.train()
    freeze_bottom_layers(encoder.transformer, int(config["frozen_layers"]))
    model = ray.train.torch.prepare_model(encoder)   # DDP across workers when there are several
    tokenizer = load_tokenizer(data.parent_dir)
    loss_fn = MultipleNegativesRankingLoss(model=None, scale=float(config["scale"]))

    batch_size = int(config["batch_size"])
    steps_per_epoch = max(1, math.ceil(data.epoch_size / (batch_size * world)))
    total_steps = max(1, min(int(config["max_steps"]), int(config["epochs"]) * steps_per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=float(config["learning_rate"]),
                                  weight_decay=float(config["weight_decay"]))
    schedule = get_linear_schedule_with_warmup(optimiser, int(config["warmup_ratio"] * total_steps), total_steps)
    positives = torch.tensor(data.positives)   # object-store arrays are read-only: copy once
    negatives = torch.tensor(data.negatives)
    tracker = TrialTracker(config.get("mlflow"), config) if rank == 0 else None
    metric = config["tuned_metric"]
    best, losses, started = -1.0, [], time.monotonic()

    for step in range(1, total_steps + 1):
        batch = sample_batch(rng, data.weights, data.positive_ids, batch_size)
        texts = [data.queries[i] for i in batch]
        encoded = tokenizer(texts, max_length=data.max_query_length, truncation=True, padding=True,
                            return_tensors="pt")
        q = model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
        loss = loss_fn.compute_loss_from_embeddings(
            [q, positives[batch].to(device), negatives[batch].to(device)], labels=None)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % int(config["eval_every_steps"]) and step != total_steps:
            continue
        scores = heldout_metrics(getattr(model, "module", model), tokenizer, data, device)
        metrics = {**scores, "loss": float(np.mean(losses)), "step": step, "total_steps": total_steps,
                   "epoch": step / steps_per_epoch,
                   "examples_per_s": step * batch_size * world / max(time.monotonic() - started, 1e-9)}
        losses = []
        if tracker:
            tracker.log(metrics, step)
        if scores[metric] > best and rank == 0:
            best = scores[metric]
            with tempfile.TemporaryDirectory() as tmp:
                save_query_tower(getattr(model, "module", model), tokenizer, Path(tmp))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
    if tracker:
        tracker.finish()


def save_query_tower(model: SentenceEncoder, tokenizer, directory: Path) -> Path:
    target = directory / QUERY_TOWER_DIR
    model.transformer.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


class TrialTracker:
    """The trial's MLflow run (a child of the fine-tune's run): hyperparameters, then curves."""

    PARAMS = ("learning_rate", "frozen_layers", "scale", "epochs", "batch_size", "max_steps", "seed")

    def __init__(self, mlflow_config: dict[str, str] | None, config: dict[str, Any]):
        self.client = None
        if not mlflow_config:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.client = MlflowClient(tracking_uri=mlflow_config["tracking_uri"])
        self.run_id = _retry(lambda: self.client.create_run(
            mlflow_config["experiment_id"], run_name=f"trial-{mlflow_config['trial_id']}",
            tags={"mlflow.parentRunId": mlflow_config["parent_run_id"], "es_ray.trial_id": mlflow_config["trial_id"],
                  "es_ray.role": "trial"}).info.run_id)
        _retry(lambda: self.client.log_batch(self.run_id, params=[Param(k, str(config[k])) for k in self.PARAMS]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow names allow no '@': ndcg@10 is logged as ndcg_at_10
        batch = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()]
        _retry(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def finish(self) -> None:
        if self.client is not None:
            _retry(lambda: self.client.set_terminated(self.run_id, "FINISHED"))


def _retry(fn, attempts: int = 5):
    """Trials log concurrently; a sqlite tracking store answers 'database is locked' now and then."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception:  # noqa: BLE001
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)
