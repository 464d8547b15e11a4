"""Reindex as a Ray job: every blue item into a green collection for a new model (re-embedded, or its
vectors copied where the new version keeps blue's item tower).

    ray job submit --working-dir . -- python -m es_ray.lifecycle.reindex --to VERSION

Steps (each one visible as the task's `stage`):
1. take the `lifecycle` lock (one reindex or switch at a time; a dead holder's lease expires),
2. deploy the version to Triton (blue keeps serving), create the green collection, turn on dual writes,
3. cut the blue key space into ranges of `reindex.range_items` ids (kept in `reindex_ranges`, so a
   restarted job skips the ranges already done),
4. Ray Data over the pending ranges: an actor pool where each actor reads a range in key order,
   embeds it through Triton in batches (or copies blue's model vectors) and writes it with COPY,
   marking the range done in the same transaction; items that fail are recorded with the stage that
   failed,
5. check green holds exactly blue's items, build the HNSW index, re-derive (or drop) click memories
   and users' adjustments,
6. mark green ready and ask the lifecycle driver to switch (`reindex.switch`: auto when the quality
   gate passed, force, never).
Copies carry the version read from blue, so a write or delete that reached green meanwhile (dual
write) always wins over the copy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import ray

from es_ray import metrics
from es_ray.config import Settings
from es_ray.improve.loop import improvement_lock, learning_from, rederive
from es_ray.inference.encoder import item_tower_fingerprint
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import QUERY_ENCODER
from es_ray.logs import get_logger
from es_ray.lifecycle.reindex_worker import ReindexWorker
from es_ray.lifecycle.switching import SwitchRefused, drop_green
from es_ray.lifecycle.task_job import TaskJob, run_as_task
from es_ray.store import blue_green, clickstream, db, fusion_weights, locks, reindex_ranges, tasks
from es_ray.store.blue_green import Target
from es_ray.store.collections import Collection, collection_name
from es_ray.store.lexical import LexicalIndex

log = get_logger("es_ray.lifecycle.reindex")
POOL_START_TIMEOUT_S = 600  # how long the worker pool may take to start (Ray Data's wait_for_min_actors_s)


class ReindexIncomplete(RuntimeError):
    pass


# --- the job ------------------------------------------------------------------------------------------

class ReindexMetrics:
    """Ray metrics (Prometheus, Ray dashboard): items done, items/s and ETA of the running reindex."""

    def __init__(self, collection: str):
        from ray.util.metrics import Gauge

        tags = {"collection": collection}
        self.done = Gauge("es_ray_reindex_items_done", "Items re-embedded into the green collection", ("collection",))
        self.total = Gauge("es_ray_reindex_items_total", "Items the reindex will re-embed", ("collection",))
        self.rate = Gauge("es_ray_reindex_items_per_second", "Reindex throughput", ("collection",))
        self.eta = Gauge("es_ray_reindex_eta_seconds", "Estimated seconds to the end of the reindex", ("collection",))
        for gauge in (self.done, self.total, self.rate, self.eta):
            gauge.set_default_tags(tags)

    def set(self, progress: dict[str, Any]) -> None:
        self.done.set(progress["items_done"])
        self.total.set(progress["items_total"])
        self.rate.set(progress["items_per_s"])
        self.eta.set(progress["eta_s"] or 0)


def prepare_green(settings: Settings, driver, conn, version: int, progress) -> tuple[Target, Target]:
    """Deploys the version, creates its collection and turns on dual writes; returns (blue, green)."""

    state = blue_green.get_state(conn)
    if state.blue.model_version == version:
        raise ValueError(f"version {version} is already blue: nothing to reindex")
    progress({"stage": "deploying", "to_version": version})
    model = blue_green.ModelRecord(**ray.get(driver.deploy_version.remote(version)))  # blue keeps serving
    if model.state == "rejected":
        log.warning("reindex.rejected_model", version=version, note="the quality gate refused this version")
    name = collection_name(version)
    if state.green is not None and state.green.collection != name:
        drop_green(conn, state.green.collection, reason=f"replaced by a reindex to v{version}")
    if state.previous is not None and state.previous.collection == name:
        raise ValueError(f"collection {name} is the previous blue (kept for rollback): roll back instead")
    progress({"stage": "creating the green collection"})
    Collection(name, model.dim).create(conn, settings.postgres.hnsw_m, settings.postgres.hnsw_ef_construction,
                                       index=settings.reindex.hnsw == "during",
                                       lexical_index=LexicalIndex.from_settings(settings.search))
    known = blue_green.get_collection(conn, name)
    if known is None or known["state"] != "building":
        # A new reindex, not a resumed one: checkpoints and a fusion learned in an earlier life of this
        # collection (names are reused: v<version>) do not count.
        reindex_ranges.forget(conn, name)
        fusion_weights.forget(conn, name)
        blue_green.save_collection(conn, name, version, "building")
    blue_green.set_green(conn, version, name)
    green = Target(version, name, model.dim, model.source_dir, model.max_length, model.triton_grpc_url)
    return state.blue, green


def rederive_adjustments(settings: Settings, manifest, conn, green: Target, progress, evidence_reader
                         ) -> dict[str, int]:
    """Click memories and users' adjustments derived again on the green collection, with the new
    model's query vectors (vectors of two models are never mixed)."""

    encoder = TritonEncoder.of(manifest.triton_grpc_url, QUERY_ENCODER, green, settings)
    return rederive(conn, Collection(green.collection, green.dim), encoder.embed_queries, learning_from(settings),
                    settings.improve.batch_sessions, progress, evidence_reader)


@contextmanager
def handed_over_evidence(manifest, conn, green: Target):
    """Green holds every item now (dual writes keep it so): from here on the improvement passes teach it
    users' sessions themselves. Yields a read-only connection whose snapshot holds exactly the user
    evidence counted before that moment, which the replay teaches: green's improvement lock is held from
    the hand-over until the snapshot is taken, so no pass commits in between and each session reaches
    green once, by the replay or by a pass."""
    key = improvement_lock(Collection(green.collection, green.dim))
    with db.connect(manifest.postgres_dsn) as reader:
        locks.session_lock(conn, key)
        try:
            blue_green.hand_users_to_passes(conn, green.collection)
            reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            reader.execute("SELECT 1")   # a snapshot is taken by the first statement, not by BEGIN
        finally:
            locks.session_unlock(conn, key)
        yield reader


def reindex(settings: Settings, manifest, driver, task_id: str, version: int,
            progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every blue item into a green collection for `version` (steps 2 to 5 of the module's docstring);
    returns what was done, for the task's result."""
    started = time.monotonic()
    conn = db.connect(manifest.postgres_dsn)
    blue, green = prepare_green(settings, driver, conn, version, progress)
    source = Collection(blue.collection, blue.dim)
    n_ranges = reindex_ranges.plan(conn, source, green.collection, settings.reindex.range_items)
    todo = reindex_ranges.pending(conn, green.collection)
    total_items = source.count(conn)
    log.info("reindex.start", task_id=task_id, source=blue.collection, green=green.collection, ranges=n_ranges,
             pending=len(todo), items=total_items)
    copy_vectors = reuses_item_vectors(settings, blue, green)
    log.info("reindex.item_vectors", mode="copied" if copy_vectors else "embedded")
    loaded = load_ranges(settings, manifest, conn, task_id, (blue, green), copy_vectors, n_ranges, total_items,
                         progress)
    check_complete(conn, source, green)
    index_s = build_index(settings, conn, green, progress)
    adjustments = carry_adjustments(settings, manifest, conn, green, progress)
    blue_green.save_collection(conn, green.collection, version, "ready")
    result = {"to_version": version, "from_version": blue.model_version, "collection": green.collection,
              "items": Collection(green.collection, green.dim).count(conn), "ranges": n_ranges,
              "ranges_this_run": len(todo), **loaded, "index_s": round(index_s, 1), "hnsw": settings.reindex.hnsw,
              "adjustments": adjustments, "seconds": round(time.monotonic() - started, 1),
              "item_vectors": ("copied from blue: the item tower is unchanged, only the query tower was trained"
                               if copy_vectors else "embedded by the new model's item tower")}
    conn.close()
    log.info("reindex.done", **{k: v for k, v in result.items() if k != "adjustments"})
    return result


def reuses_item_vectors(settings: Settings, blue: Target, green: Target) -> bool:
    """A fine-tune of the query tower keeps blue's item tower: the item vectors would come out the same
    (as long as chunking is unchanged: set reindex.reuse_item_vectors false to re-chunk every item)."""
    blue_tower = item_tower_fingerprint(blue.source_dir)
    return (settings.reindex.reuse_item_vectors and blue_tower is not None
            and blue_tower == item_tower_fingerprint(green.source_dir))


def load_ranges(settings: Settings, manifest, conn, task_id: str, targets: tuple[Target, Target],
                copy_vectors: bool, n_ranges: int, total_items: int,
                progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Runs the worker pool over the pending ranges, `reindex.passes` times at most (a later pass redoes
    the ranges where items failed), reporting progress after every batch; returns the load's figures."""

    green = targets[1]
    _, done_before, items_before = reindex_ranges.totals(conn, green.collection)
    gauges = ReindexMetrics(green.collection)
    state = {"items_done": items_before, "items_total": total_items, "ranges_total": n_ranges,
             "ranges_done": done_before, "resumed_from_ranges": done_before, "items_per_s": 0.0, "eta_s": None,
             "failed": 0}
    progress({"stage": "reindexing", **state})
    started = time.monotonic()
    first_range_s = None  # the pool's start plus one range: the load's fixed cost, in every result
    new_items = 0
    nodes: dict[str, int] = {}  # Ray node id -> ranges its workers ran (this run)
    # The pool starts whole before the first range is handed out, so ranges spread over its actors (and
    # their nodes) instead of queueing on the first actor up; a pool that cannot be placed fails the job.
    ray.data.DataContext.get_current().wait_for_min_actors_s = POOL_START_TIMEOUT_S
    for _ in range(settings.reindex.passes):
        pending = reindex_ranges.pending(conn, green.collection)
        if not pending:
            break
        state["failed"] = 0
        dataset = range_dataset(settings, manifest, pending, task_id, targets, copy_vectors)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            first_range_s = first_range_s or time.monotonic() - started
            new_items += count_batch(batch, state, nodes, green.collection)
            rate = new_items / max(time.monotonic() - started, 1e-9)
            state["items_done"] = items_before + new_items
            state["items_per_s"] = round(rate, 2)
            state["eta_s"] = round(max(total_items - state["items_done"], 0) / rate, 1) if rate > 0 else None
            progress({"stage": "reindexing", **state})
            gauges.set(state)
    load_s = time.monotonic() - started
    return {"resumed_from_ranges": done_before, "load_s": round(load_s, 1),
            "first_range_s": round(first_range_s, 1) if first_range_s else None,
            "items_per_s": round(new_items / max(load_s, 1e-9), 2), "nodes": nodes}


def range_dataset(settings: Settings, manifest, pending: list[dict[str, Any]], task_id: str,
                  targets: tuple[Target, Target], copy_vectors: bool):
    """The Ray Data pipeline over `pending` ranges: one range per call of a `ReindexWorker` actor."""

    blue, green = targets
    return ray.data.from_items(pending).map_batches(
        ReindexWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=settings.reindex.workers),
        fn_constructor_args=(settings.model_dump(mode="json"), manifest.triton_grpc_url, manifest.postgres_dsn,
                             blue.__dict__, green.__dict__, task_id, copy_vectors),
        num_cpus=0.25,  # the model runs in Triton; workers tokenise, wait on the network and COPY
        scheduling_strategy="SPREAD")  # on a cluster: one actor per node first, not all on the emptiest


def count_batch(batch: dict[str, np.ndarray], state: dict[str, Any], nodes: dict[str, int], collection: str) -> int:
    """Adds a batch of range results to the progress `state`, `nodes` and the Ray metrics; returns the
    items of the ranges it completed."""
    new_items = 0
    for items, failed, node_id in zip(batch["items"], batch["failed"], batch["node_id"]):
        state["ranges_done"] += 1 if not failed else 0
        state["failed"] += int(failed)
        new_items += int(items) if not failed else 0
        nodes[str(node_id)] = nodes.get(str(node_id), 0) + 1
    metrics.count("es_ray_reindex_written_items", sum(int(w) for w in batch["written"]), collection=collection)
    metrics.count("es_ray_reindex_failed_items", sum(int(f) for f in batch["failed"]), collection=collection)
    state["nodes"] = dict(nodes)
    return new_items


def check_complete(conn, source: Collection, green: Target) -> None:
    """ReindexIncomplete unless every item made it: no failed item left, and green holds exactly blue's ids."""
    failed_total, failed_sample = reindex_ranges.failures(conn, green.collection)
    if failed_total:
        raise ReindexIncomplete(f"{failed_total} items failed (run the reindex again to retry them): "
                                f"{json.dumps(failed_sample[:5])}")
    differences = source.differences(conn, Collection(green.collection, green.dim))
    if differences["missing"] or differences["extra"]:
        raise ReindexIncomplete(f"green differs from blue after every range was done: {differences}")


def build_index(settings: Settings, conn, green: Target, progress: Callable[[dict[str, Any]], None]) -> float:
    """Builds green's HNSW index after the load (`reindex.hnsw: after`); returns the seconds it took."""
    if settings.reindex.hnsw != "after":
        return 0.0
    progress({"stage": "building the HNSW index"})
    started = time.monotonic()
    # CONCURRENTLY: dual writes to green go on while the index builds.
    Collection(green.collection, green.dim).create_index(conn, settings.postgres.hnsw_m,
                                                         settings.postgres.hnsw_ef_construction, concurrently=True,
                                                         work_mem=settings.postgres.maintenance_work_mem)
    return time.monotonic() - started


def carry_adjustments(settings: Settings, manifest, conn, green: Target,
                      progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """What clicks taught, on green: re-derived with the new model (`reindex.adjustments: rederive`) or
    dropped. Either way the sessions improved from now on reach green through the improvement passes."""
    with handed_over_evidence(manifest, conn, green) as evidence_reader:
        if settings.reindex.adjustments == "rederive":
            return {"mode": "rederive",
                    **rederive_adjustments(settings, manifest, conn, green, progress, evidence_reader)}
    dropped = clickstream.count_improved(conn)
    log.warning("reindex.adjustments_dropped", sessions=dropped, collection=green.collection)
    return {"mode": "drop", "sessions_not_replayed": dropped}


def request_switch(driver, force: bool, owner: str, green: str) -> dict[str, Any]:
    """Asks the lifecycle driver to switch to green; a refusal (gate not passed) or a failed switch is
    part of the answer: the reindex itself is done."""

    try:
        # The lock owner names this run of the task: a retried call does not switch a second time.
        return ray.get(driver.switch.remote(force=force, lock_owner=owner, expected_green=green,
                                            idempotency_key=f"{owner}:{green}"))
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None) or err
        if isinstance(cause, SwitchRefused):
            log.info("reindex.not_switched", reason=str(cause))
            return {"status": "not switched", "reason": str(cause)}
        # Green is complete either way: the reindex is done, and a later switch can still make it blue.
        log.error("reindex.switch_failed", error=f"{type(cause).__name__}: {cause}"[:2000])
        return {"status": "failed", "reason": f"{type(cause).__name__}: {cause}"[:2000]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--to", type=int, default=None, help="the model version to reindex to")
    parser.add_argument("--task-id", default=None, help="an existing pending task to run (set by the HTTP API)")
    parser.add_argument("--switch", choices=("auto", "force", "never"), default=None,
                        help="when green is complete: auto (if the quality gate passed), force, never "
                             "(default: reindex.switch)")
    parser.add_argument("--hnsw", choices=("after", "during"), default=None,
                        help="build the green HNSW index after the load or during it (default: reindex.hnsw)")
    parser.add_argument("--namespace", default="es-ray", help="Ray namespace of the lifecycle driver")
    args = parser.parse_args(argv)
    if args.to is None and args.task_id is None:
        parser.error("--to VERSION is required")

    def work(job: TaskJob) -> dict[str, Any]:
        params, settings = job.task.params, job.settings
        version = int(params.get("to") or args.to)
        switch = args.switch or params.get("switch") or settings.reindex.switch
        settings.reindex.hnsw = args.hnsw or params.get("hnsw") or settings.reindex.hnsw
        result = reindex(settings, job.manifest, job.driver, job.task.task_id, version, job.progress)
        job.progress({"stage": "switching" if switch != "never" else "done"})
        if switch != "never":
            result["switch"] = request_switch(job.driver, switch == "force", job.lock_owner, result["collection"])
        return result

    return run_as_task(tasks.REINDEX, args.namespace, args.task_id, {"to": args.to, "switch": args.switch,
                                                                     "hnsw": args.hnsw}, work,
                       lambda r: {**{k: r[k] for k in ("to_version", "items", "items_per_s")},
                                  "switch": r.get("switch", {}).get("status", "not requested")},
                       lock=locks.LIFECYCLE)


if __name__ == "__main__":
    sys.exit(main())
