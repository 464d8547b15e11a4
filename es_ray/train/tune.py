"""Hyperparameter search: Ray Tune over Ray Train trials.

Ray 2.60 runs Train V2, where `Tuner(trainer)` no longer works. The pattern that does (DESIGN.md): a
Tune function trainable per trial that builds a `TorchTrainer` and runs it, with
`TuneReportCallback` forwarding every `ray.train.report` (metrics and checkpoint path) to Tune, so
Tune's scheduler (ASHA) sees each report and can stop a poor trial early. The trial's own process
takes a sliver of a CPU; its training worker takes `cpus_per_trial` (and a GPU where there is one).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from es_ray.logs import get_logger
from es_ray.priority import run_as_batch
from es_ray.train.config import FinetuneConfig
from es_ray.train.trainer import train_loop_per_worker

log = get_logger(__name__)


def search_space(config: FinetuneConfig) -> dict[str, Any]:
    from ray import tune

    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform}
    space = {}
    for key, spec in config.space.items():
        kind, values = next(iter(spec.items()))
        space[key] = tune.choice(values) if kind == "choice" else makers[kind](*values)
    return space


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer run whose reports reach Tune through TuneReportCallback."""
    import ray
    from ray import tune
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    static = config["static"]
    run_as_batch(static["batch_nice"])
    trial_id = tune.get_context().get_trial_id()
    mlflow = {**static["mlflow"], "trial_id": trial_id} if static.get("mlflow") else None
    loop_config = {**{k: v for k, v in config.items() if k != "static"}, **static["train"], "data": static["data"],
                   "mlflow": mlflow, "batch_nice": static["batch_nice"]}
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": static["cpus_per_trial"]}),
        run_config=RunConfig(name=f"{static['run_name']}-{trial_id}", storage_path=static["storage_path"],
                             callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


@dataclass
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, float]          # the report of its checkpoint (the end of its schedule)
    checkpoint_path: str | None
    seconds: float                     # the trial's own wall time
    reports: int
    status: str                        # completed | stopped (by ASHA) | error
    error: str | None = None


def _last_line(error: BaseException | None) -> str | None:
    """The root cause of a failed trial, without the nested Ray tracebacks."""
    if error is None:
        return None
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


@dataclass
class SearchOutcome:
    trials: list[TrialOutcome]
    wall_s: float
    max_concurrent: int

    @property
    def ideal_wall_s(self) -> float:
        """Sum of trial times spread perfectly over the concurrent slots."""
        return sum(t.seconds for t in self.trials) / max(1, min(self.max_concurrent, len(self.trials)))

    def best(self, metric: str) -> TrialOutcome | None:
        usable = [t for t in self.trials if t.checkpoint_path and metric in t.metrics]
        return max(usable, key=lambda t: t.metrics[metric]) if usable else None


# Tune pickles its callbacks with the experiment state; a reporter (which may hold a database
# connection) is looked up here by key instead, in the driver process where callbacks run.
_REPORTERS: dict[str, Callable[[dict[str, Any]], None]] = {}


class ProgressCallback(Callback):
    """Passes trial progress to the reporter registered under `key` (the task row), at most every 2 s."""

    def __init__(self, key: str, total: int, metric: str):
        self.key, self.total, self.metric = key, total, metric
        self.done, self.running, self.best, self.last = set(), set(), None, 0.0

    def _send(self, force: bool = False) -> None:
        if self.key in _REPORTERS and (force or time.monotonic() - self.last > 2):
            self.last = time.monotonic()
            _REPORTERS[self.key]({"trials_total": self.total, "trials_done": len(self.done),
                                  "trials_running": len(self.running), "best": self.best})

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)
        self._send()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result and (self.best is None or result[self.metric] > self.best[self.metric]):
            self.best = {"trial": trial.trial_id, self.metric: round(result[self.metric], 4), "step": result.get("step")}
        self._send()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        self._send(force=True)

    on_trial_error = on_trial_complete


def run_search(config: FinetuneConfig, data_ref, storage_path: Path, run_name: str,
               mlflow: dict[str, str] | None = None,
               progress: Callable[[dict[str, Any]], None] | None = None, batch_nice: int = 0) -> SearchOutcome:
    """Runs the Tune search; returns every trial's checkpointed report, checkpoint and time. Trials and
    their training workers run at niceness `batch_nice` (es_ray/priority.py)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    reports_per_trial = math.ceil(config.train.max_steps / config.train.eval_every_steps) + 1
    metric = config.tune.metric
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=reports_per_trial,
                               grace_period=config.tune.grace_period, reduction_factor=config.tune.reduction_factor)
                 if config.tune.scheduler == "asha" else FIFOScheduler())
    static = {"data": data_ref, "mlflow": mlflow, "cpus_per_trial": config.tune.cpus_per_trial, "batch_nice": batch_nice,
              "storage_path": str(storage_path), "run_name": run_name,
              "train": {"tuned_metric": metric, **config.train.model_dump()}}
    callbacks, key = [], f"reporter-{time.monotonic_ns()}"
    if progress:
        _REPORTERS[key] = progress
        callbacks.append(ProgressCallback(key, config.tune.num_samples, metric))
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": 0.01}),
        param_space={**search_space(config), "static": static},
        tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                    num_samples=config.tune.num_samples,
                                    # seeded draws: the same config samples the same trials, so runs
                                    # (naive against debiased, say) compare like with like
                                    search_alg=BasicVariantGenerator(
                                        random_state=config.train.seed,
                                        # the configured trial first: Tune can only add better ones to it
                                        points_to_evaluate=[dict(config.trial)] if config.trial else None),
                                    max_concurrent_trials=config.tune.max_concurrent_trials,
                                    time_budget_s=config.tune.time_budget_s),
        run_config=tune.RunConfig(name=run_name, storage_path=str(storage_path), callbacks=callbacks,
                                  verbose=0),
    )
    started = time.monotonic()
    try:
        grid = tuner.fit()
    finally:
        _REPORTERS.pop(key, None)
    wall = time.monotonic() - started
    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        trial_config = {k: v for k, v in (result.config or {}).items() if k != "static"}
        if frame is None or frame.empty or metric not in frame:
            trials.append(TrialOutcome(result.metrics.get("trial_id", "?") if result.metrics else "?", trial_config,
                                       {}, None, 0.0, 0, "error", _last_line(result.error)))
            continue
        if "checkpoint_path" in frame:
            frame = frame.assign(checkpoint_path=frame["checkpoint_path"].where(frame["checkpoint_path"].notna(), None))
            saved = frame[frame["checkpoint_path"].notna()]
        else:
            saved = frame.iloc[0:0]
        best_row = (saved if not saved.empty else frame).sort_values(metric).iloc[-1]
        last = frame.iloc[-1]
        completed = int(last.get("step", 0)) >= int(last.get("total_steps", 1))
        trials.append(TrialOutcome(
            trial_id=str(last["trial_id"]), config=trial_config,
            metrics={k: float(best_row[k]) for k in ("ndcg@10", "mrr@10", "recall@100", "step") if k in best_row},
            checkpoint_path=best_row.get("checkpoint_path") if not saved.empty else None,
            seconds=float(last["time_total_s"]), reports=len(frame),
            status="error" if result.error else ("completed" if completed else "stopped"),
            error=_last_line(result.error)))
    log.info("tune.done", trials=len(trials), wall_s=round(wall, 1),
             ideal_s=round(SearchOutcome(trials, wall, config.tune.max_concurrent_trials).ideal_wall_s, 1))
    return SearchOutcome(trials, wall, config.tune.max_concurrent_trials)
