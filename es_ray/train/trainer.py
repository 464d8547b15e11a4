"""One trial's training: the query tower learns from click examples and corpus pseudo-queries.

`fit` is plain torch, run the same way by the Ray Train worker (`train_loop_per_worker`, under Tune)
and in-process by the quality harness (`es_ray.bench.quality`), so what the harness measures is
what the job trains. Each step embeds a batch of queries with the trainable encoder and scores them
against every item of the collection (the parent's vectors, frozen: `losses.CollectionSoftmaxLoss`).
A batch is `corpus_share` pseudo-queries from the items' own text (`corpus_queries.py`) and the rest
click examples drawn in proportion to their weights. Every `eval_every_steps` the weights averaged
with the parent's (`tuned_weight`, WiSE-FT: `weight_averaging.py`) rank the held-out queries over
the whole collection; the caller is told the scores and decides about checkpoints.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from es_ray import retries
from es_ray.priority import run_as_batch
from es_ray.inference.encoder import QUERY_TOWER_DIR, SentenceEncoder, load_encoder, load_tokenizer
from es_ray.train.item_vectors import ItemVectors
from es_ray.train.losses import CollectionSoftmaxLoss
from es_ray.train.evaluation import evaluate
from es_ray.train.weight_averaging import interpolate


@dataclass
class TrainingData:
    """Everything a trial needs, put in the object store once and shared by all trials."""

    queries: list[str]                       # click examples: query text
    positives: np.ndarray                    # (n,) item number of the item to rank first
    weights: np.ndarray                      # (n,) sampling weights
    excluded: dict[str, np.ndarray]          # query text -> item numbers out of its softmax denominator
    corpus_queries: list[str]                # pseudo-queries from the items' text
    corpus_positives: np.ndarray             # (m,) the item each came from
    heldout_queries: dict[str, str]          # held-out query id -> text
    heldout_qrels: dict[str, dict[str, int]]
    heldout_shown: dict[str, list[str]]      # held-out query id -> the items its sessions showed
    items: ItemVectors
    parent_dir: str
    max_query_length: int
    epoch_size: int                # click examples per epoch: the clicks the examples came from, whatever the method


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


def query_vectors(model: SentenceEncoder, tokenizer, texts: list[str], max_length: int, device="cpu") -> np.ndarray:
    """Query vectors in eval mode without gradients (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        vectors = embed_queries(model, tokenizer, texts, max_length, device).float().cpu().numpy()
    model.train(was_training)
    return vectors


def heldout_metrics(model: SentenceEncoder, tokenizer, data: TrainingData, device) -> dict[str, float]:
    """Held-out queries ranked exactly over the item vectors, scored with trec_eval against the
    click-model labels (`examples.heldout_labels`).

    Labels exist only for what the blue model showed. Over the whole collection, any other model is
    punished for every unshown item it ranks above a labelled one, relevant or not, and the blue
    model (which ranked all labelled items in its top 10) looks best: measured in the quality
    harness, that gate ranked candidates against the test qrels (Kendall tau below 0). nDCG@10 and
    MRR@10 are therefore computed on condensed lists (Sakai, "Alternatives to Bpref", SIGIR 2007):
    each model's order of the shown items only; `whole_ndcg@10` and Recall@100 are over all items.
    """
    qids = sorted(data.heldout_queries)
    vectors = query_vectors(model, tokenizer, [data.heldout_queries[q] for q in qids], data.max_query_length, device)
    return heldout_metrics_of(vectors, data)


def heldout_metrics_of(vectors: np.ndarray, data: TrainingData) -> dict[str, float]:
    """heldout_metrics for given query vectors, one per held-out query in sorted id order."""
    qids = sorted(data.heldout_queries)
    index = data.items.index()
    condensed = {}
    for start in range(0, len(qids), 256):
        scores = data.items.item_scores(vectors[start:start + 256])
        for row, qid in enumerate(qids[start:start + 256]):
            condensed[qid] = {item: float(scores[row, index[item]]) for item in data.heldout_shown[qid]}
    on_shown = evaluate(condensed, data.heldout_qrels)
    whole = evaluate(data.items.rank(vectors, qids, k=100), data.heldout_qrels)
    return {"ndcg@10": on_shown["ndcg@10"], "mrr@10": on_shown["mrr@10"], "recall@100": whole["recall@100"],
            "whole_ndcg@10": whole["ndcg@10"], "shown_log_likelihood": _shown_log_likelihood(condensed, data)}


def _shown_log_likelihood(condensed: dict[str, dict[str, float]], data: TrainingData, scale: float = 20.0) -> float:
    """Mean grade-weighted log-probability of the labelled items under a softmax over the shown ones."""
    total, weight = 0.0, 0.0
    for qid, scores in condensed.items():
        items = list(scores)
        logits = np.asarray([scores[i] for i in items]) * scale
        log_p = logits - np.logaddexp.reduce(logits)
        for item, grade in data.heldout_qrels.get(qid, {}).items():
            if item in scores:
                total += grade * log_p[items.index(item)]
                weight += grade
    return total / max(weight, 1e-9)


def sample_rows(rng: np.random.Generator, weights: np.ndarray, size: int) -> np.ndarray:
    """`size` example rows drawn in proportion to the weights, without repeats where there are enough."""
    size = min(size, len(weights))
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(len(weights), size=size, replace=False, p=weights / weights.sum())


@dataclass
class Hyperparameters:
    learning_rate: float
    frozen_layers: int
    scale: float
    epochs: int
    batch_size: int
    max_steps: int
    eval_every_steps: int
    warmup_ratio: float
    weight_decay: float
    corpus_share: float
    tuned_weight: float
    seed: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Hyperparameters":
        return cls(**{k: config[k] for k in cls.__dataclass_fields__})


def fit(data: TrainingData, hp: Hyperparameters, on_eval: Callable[[dict[str, float], SentenceEncoder, Any], None],
        device="cpu", wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m, world: int = 1) -> None:
    """Trains the query tower for min(max_steps, epochs x steps per epoch) steps. Every eval_every_steps
    (and at the end) calls on_eval(metrics, the parent-averaged model, tokenizer)."""
    torch.manual_seed(hp.seed)
    rng = np.random.default_rng(hp.seed)
    encoder = load_encoder(data.parent_dir)
    parent_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    eval_model = copy.deepcopy(encoder).to(device)
    encoder.train()
    freeze_bottom_layers(encoder.transformer, hp.frozen_layers)
    model = wrap(encoder)
    inner = getattr(model, "module", model)
    tokenizer = load_tokenizer(data.parent_dir)
    loss_fn = CollectionSoftmaxLoss(scale=hp.scale)

    corpus_rows = int(round(hp.batch_size * hp.corpus_share)) if len(data.corpus_queries) else 0
    click_rows = hp.batch_size - corpus_rows if len(data.queries) else 0
    steps_per_epoch = max(1, math.ceil(data.epoch_size / max(1, click_rows * world)))
    total_steps = max(1, min(hp.max_steps, hp.epochs * steps_per_epoch))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    from transformers import get_linear_schedule_with_warmup

    schedule = get_linear_schedule_with_warmup(optimiser, int(hp.warmup_ratio * total_steps), total_steps)
    chunks = torch.tensor(data.items.chunks, device=device)   # object-store arrays are read-only: copy once
    owner = torch.tensor(data.items.owner, device=device)
    n_items = len(data.items)
    uniform = np.ones(len(data.corpus_queries))
    losses, started = [], time.monotonic()

    for step in range(1, total_steps + 1):
        rows = sample_rows(rng, data.weights, click_rows)
        pseudo = sample_rows(rng, uniform, corpus_rows)
        texts = [data.queries[i] for i in rows] + [data.corpus_queries[i] for i in pseudo]
        positive = torch.tensor(np.r_[data.positives[rows], data.corpus_positives[pseudo]].astype(np.int64),
                                device=device)
        excluded = torch.zeros((len(texts), n_items), dtype=torch.bool)
        for row, i in enumerate(rows):
            excluded[row, torch.from_numpy(data.excluded.get(data.queries[i], np.zeros(0, np.int64)))] = True
        encoded = tokenizer(texts, max_length=data.max_query_length, truncation=True, padding=True,
                            return_tensors="pt")
        q = model(encoded["input_ids"].to(device), encoded["attention_mask"].to(device))
        loss = loss_fn(q, chunks, owner, n_items, positive, excluded.to(device))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % hp.eval_every_steps and step != total_steps:
            continue
        tuned = {k: v.detach() for k, v in inner.state_dict().items()}
        eval_model.load_state_dict(interpolate(parent_state, tuned, hp.tuned_weight) if hp.tuned_weight < 1 else tuned)
        scores = heldout_metrics(eval_model, tokenizer, data, device)
        metrics = {**scores, "loss": float(np.mean(losses)), "step": step, "total_steps": total_steps,
                   "epoch": step / steps_per_epoch,
                   "examples_per_s": step * hp.batch_size * world / max(time.monotonic() - started, 1e-9)}
        losses = []
        on_eval(metrics, eval_model, tokenizer)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: the trial's hyperparameters plus `data` (an object ref to
    TrainingData), `tuned_metric`, the train section of the config, and `mlflow` (where to log)."""
    import ray
    import ray.train
    import ray.train.torch

    run_as_batch(config.get("batch_nice", 0))  # the forward and backward passes: the fine-tune's CPU
    data: TrainingData = ray.get(config["data"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    hp = Hyperparameters.from_config({**config, "seed": int(config["seed"]) + rank})
    tracker = TrialTracker(config.get("mlflow"), config) if rank == 0 else None

    def report(metrics: dict[str, float], model: SentenceEncoder, tokenizer) -> None:
        if tracker:
            tracker.log(metrics, int(metrics["step"]))
        # The model kept is the one at the end of the schedule (the learning rate has decayed to 0), not
        # the checkpoint with the best held-out score: measured in the quality harness, that choice
        # follows the held-out noise and picked checkpoints 0.002 to 0.018 below the last one on the
        # test queries. The held-out reports still drive ASHA, Tune's choice of trial and the gate.
        if rank == 0 and metrics["step"] == metrics["total_steps"]:
            with tempfile.TemporaryDirectory() as tmp:
                save_query_tower(model, tokenizer, Path(tmp))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    fit(data, hp, report, device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model, world=world)
    if tracker:
        tracker.finish()


def save_query_tower(model: SentenceEncoder, tokenizer, directory: Path) -> Path:
    target = directory / QUERY_TOWER_DIR
    model.transformer.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target


class TrialTracker:
    """The trial's MLflow run (a child of the fine-tune's run): hyperparameters, then curves."""

    PARAMS = ("learning_rate", "frozen_layers", "scale", "epochs", "batch_size", "max_steps", "corpus_share",
              "tuned_weight", "seed")

    def __init__(self, mlflow_config: dict[str, str] | None, config: dict[str, Any]):
        self.client = None
        if not mlflow_config:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Param

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.client = MlflowClient(tracking_uri=mlflow_config["tracking_uri"])
        # Trials log concurrently; a sqlite tracking store answers 'database is locked' now and then.
        self.retry = retries.retrying(retries.configured().mlflow, "mlflow")
        self.run_id = self.retry(lambda: self.client.create_run(
            mlflow_config["experiment_id"], run_name=f"trial-{mlflow_config['trial_id']}",
            tags={"mlflow.parentRunId": mlflow_config["parent_run_id"], "es_ray.trial_id": mlflow_config["trial_id"],
                  "es_ray.role": "trial"}).info.run_id)
        self.retry(lambda: self.client.log_batch(self.run_id, params=[Param(k, str(config[k])) for k in self.PARAMS]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow names allow no '@': ndcg@10 is logged as ndcg_at_10
        batch = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()]
        self.retry(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def finish(self) -> None:
        if self.client is not None:
            self.retry(lambda: self.client.set_terminated(self.run_id, "FINISHED"))
