"""Ray Data's cluster-wide helper actors, stopped while no Ray Data work runs.

Every Ray Data execution (Ray 2.60) gets or creates three named, detached actors: the stats actor
(`datasets_stats_actor`: dataset ids, the dashboard's Data view, Ray Data's metrics), the autoscaling
coordinator (merges resource requests for Ray's autoscaler) and the actor location tracker (which node
each map actor runs on). They are detached on purpose, so that every driver of the cluster shares one of
each and none dies with the job that made it; no DataContext field or environment variable avoids them.
So they outlive the last job: three idle Ray workers (after a demo 0.0235 of a core and 303 MiB PSS
together, BENCHMARKS.md "Idle stack"). The next execution creates them again by name (`get_if_exists`),
at the cost of their start-up. Ray Train does the same with the autoscaling coordinator alone, in every
trial of a fine-tune (it sends the coordinator its workers' resource requests, and only logs a warning
if it has gone), so that one can be left without the stats actor beside it.

When to stop them: only when the stats actor holds no dataset that is pending or running. Every
execution registers its dataset there before it asks the other two for anything, and marks it finished
or failed when it ends, so a job in flight keeps them alive. A job killed mid-run leaves its dataset
"running" in the stats actor, which then keeps all three alive until Ray restarts: the safe side.
A new execution could register between that look and the kill and then meet a dead tracker, so the two
sides also share a Postgres advisory lock: every es-ray Ray Data run (the bulk upsert job) and Ray Train
run (a fine-tune's trials) holds it shared while it runs (`in_use`), and the stop happens only under it
exclusively,
taken without waiting (`stop_if_idle`). A run that starts meanwhile waits the few milliseconds of the
kill, and Ray Data creates the actors again. The lifecycle driver also never stops them while a task of
its own (a reindex) is active.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import ray

from es_ray.logs import get_logger
from es_ray.store import db

log = get_logger(__name__)

# (name, namespace) of each, as Ray 2.60's ray/data/_internal creates them: stats.py, execution/node_trackers/
# actor_location.py, cluster_autoscaler/default_autoscaling_coordinator.py. The stats actor comes first:
# it is the one that says whether work runs.
STATS_ACTOR = ("datasets_stats_actor", "_dataset_stats_actor")
ACTORS = (STATS_ACTOR, ("AutoscalingCoordinator", "AutoscalingCoordinator"),
          ("ActorLocationTracker", "ActorLocationTracker"))
BUSY_STATES = ("PENDING", "RUNNING")
LOCK_KEY = 0x6573_7261_7964  # pg advisory lock key ("esrayd"): es-ray's Ray Data runs against the stop


@contextmanager
def in_use(dsn: str) -> Iterator[None]:
    """Held around a Ray Data or Ray Train run: the actors are not stopped until it ends (its connection's
    close frees it)."""
    with db.connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (LOCK_KEY,))
        yield


def _actor(name: str, namespace: str):
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # none of that name: never created, or stopped before
        return None


def running_datasets() -> list[str]:
    """Tags of the datasets Ray Data's stats actor counts as pending or running (none without it)."""
    stats = _actor(*STATS_ACTOR)
    if stats is None:
        return []
    datasets = ray.get(stats.get_datasets.remote(), timeout=30)
    return sorted(tag for tag, state in datasets.items() if state.get("state") in BUSY_STATES)


def present() -> list[str]:
    """Names of those actors that exist now."""
    return [name for name, namespace in ACTORS if _actor(name, namespace) is not None]


def stop_if_idle(dsn: str) -> list[str]:
    """Kills the three actors when no es-ray Ray Data run holds the lock and no dataset is pending or
    running (none, where the stats actor is not there: a Ray Train run made the coordinator alone); returns
    the names killed."""
    if not present():
        return []   # none ran since the last stop
    with db.connect(dsn) as conn:
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]:
            return []   # a run of ours is in flight
        return [] if running_datasets() else _stop()


def _stop() -> list[str]:
    stopped = []
    for name, namespace in ACTORS:
        handle = _actor(name, namespace)
        if handle is not None:
            ray.kill(handle, no_restart=True)   # the coordinator and tracker would restart otherwise
            stopped.append(name)
    if stopped:
        log.info("ray_data.actors_stopped", actors=stopped)
    return stopped
