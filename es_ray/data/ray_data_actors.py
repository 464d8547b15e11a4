"""Ray Data's cluster-wide helper actors, stopped while no Ray Data work runs.

Every Ray Data execution (Ray 2.60) gets or creates three named, detached actors: the stats actor
(`datasets_stats_actor`: dataset ids, the dashboard's Data view, Ray Data's metrics), the autoscaling
coordinator (merges resource requests for Ray's autoscaler) and the actor location tracker (which node
each map actor runs on). They are detached on purpose, so that every driver of the cluster shares one of
each and none dies with the job that made it; no DataContext field or environment variable avoids them.
So they outlive the last job: three idle Ray workers (after a demo 0.0235 of a core and 303 MiB PSS
together, BENCHMARKS.md "Idle stack"). The next execution creates them again by name (`get_if_exists`),
at the cost of their start-up.

When to stop them: only when the stats actor holds no dataset that is pending or running. Every
execution registers its dataset there before it asks the other two for anything, and marks it finished
or failed when it ends, so a job in flight keeps them alive. A job killed mid-run leaves its dataset
"running" in the stats actor, which then keeps all three alive until Ray restarts: the safe side. A new
execution can start in the few milliseconds between that look and the kill; it would find a dead
tracker and fail, the same as if its node died. The lifecycle driver also never stops them while a task
of its own (a reindex) is active.
"""

from __future__ import annotations

import ray

from es_ray.logs import get_logger

log = get_logger(__name__)

# (name, namespace) of each, as Ray 2.60's ray/data/_internal creates them: stats.py, execution/node_trackers/
# actor_location.py, cluster_autoscaler/default_autoscaling_coordinator.py. The stats actor comes first:
# it is the one that says whether work runs.
STATS_ACTOR = ("datasets_stats_actor", "_dataset_stats_actor")
ACTORS = (STATS_ACTOR, ("AutoscalingCoordinator", "AutoscalingCoordinator"),
          ("ActorLocationTracker", "ActorLocationTracker"))
BUSY_STATES = ("PENDING", "RUNNING")


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


def stop_if_idle() -> list[str]:
    """Kills the three actors when no dataset is pending or running; returns the names killed."""
    if _actor(*STATS_ACTOR) is None:
        return []   # executions create the stats actor first: without it none ran since the last stop
    busy = running_datasets()
    if busy:
        return []
    stopped = []
    for name, namespace in ACTORS:
        handle = _actor(name, namespace)
        if handle is not None:
            ray.kill(handle, no_restart=True)   # the coordinator and tracker would restart otherwise
            stopped.append(name)
    if stopped:
        log.info("ray_data.actors_stopped", actors=stopped)
    return stopped
