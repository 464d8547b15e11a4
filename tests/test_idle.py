"""Idle cost: background loops back off while there is nothing to do, a switch reaches replicas by
notification, and the stack's processes are found (es_ray/stack/processes.py) so none outlives `down`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil

from es_ray.periodic import Periodic
from es_ray.stack.processes import describe, stack_processes


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_an_idle_loop_doubles_its_wait_up_to_the_cap_and_work_brings_it_back():
    answers = iter([False, False, False, False, True])   # idle four turns, then work
    waits = []
    loop = None

    def turn():
        waits.append(loop.wait_s)
        return next(answers, False)

    loop = Periodic(turn, 0.02, "test-backoff", max_interval_s=0.1)
    assert wait_for(lambda: len(waits) >= 7)
    loop.stop()
    # wait before turn n: 0.02, then doubled after each idle turn (0.04, 0.08), capped (0.1), back to 0.02
    # after the turn that found work, then doubling again.
    assert waits[:7] == [0.02, 0.04, 0.08, 0.1, 0.1, 0.02, 0.04]


def test_a_loop_without_a_cap_keeps_its_interval_and_an_error_keeps_it_short():
    calls = []

    def turn():
        calls.append(time.monotonic())
        if len(calls) == 2:
            raise RuntimeError("a bad turn")
        return False

    plain = Periodic(turn, 0.02, "test-plain")
    assert wait_for(lambda: len(calls) >= 4)
    plain.stop()
    assert plain.wait_s == 0.02

    capped_calls = []
    capped = Periodic(lambda: capped_calls.append(1) or (_ for _ in ()).throw(RuntimeError("x")), 0.02,
                      "test-errors", max_interval_s=10)
    assert wait_for(lambda: len(capped_calls) >= 3)
    capped.stop()
    assert capped.wait_s == 0.02   # failing turns are retried on time, never backed off


def test_wake_runs_a_turn_at_once_and_resets_the_interval():
    calls = []
    loop = Periodic(lambda: calls.append(time.monotonic()) and False, 5, "test-wake", max_interval_s=30)
    loop.wait_s = 30                                  # as after a long idle stretch (the wait now under way is 5 s)
    woken_at = time.monotonic()
    loop.wake()
    assert wait_for(lambda: len(calls) == 1, 2)       # long before the 5 s wait would have ended
    assert calls[0] - woken_at < 2
    assert wait_for(lambda: loop.wait_s == 5, 2)      # a turn that was woken goes back to the short interval
    loop.stop()


def test_stop_ends_a_backed_off_loop_at_once():
    loop = Periodic(lambda: False, 60, "test-stop")
    started = time.monotonic()
    loop.stop()
    threads = [t for t in threading.enumerate() if t.name == "test-stop"]
    for thread in threads:
        thread.join(2)
    assert time.monotonic() - started < 2 and not any(t.is_alive() for t in threads)


def test_stack_processes_are_those_naming_the_state_dir_and_their_children(tmp_path):
    state = tmp_path / "state"
    (state / "ray").mkdir(parents=True)
    # A parent naming the state dir with a child that does not; a process of another state dir; one
    # whose environment says it belongs to this state dir's Ray (as Ray Client's proxy does).
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "time.sleep(60)", f"--temp-dir={state}/ray"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", f"--temp-dir={state}-other/ray"])
    by_env = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={"RAY_TMPDIR": str(state / "ray")})
    try:
        assert wait_for(lambda: len(psutil.Process(parent.pid).children()) == 1)
        child = psutil.Process(parent.pid).children()[0].pid
        found = {p.pid for p in stack_processes(state)}
        assert found == {parent.pid, child, by_env.pid}
    finally:
        for process in (parent, other, by_env):
            for leftover in psutil.Process(process.pid).children(recursive=True):
                leftover.kill()
            process.kill()
            process.wait()
    assert stack_processes(state) == []


class Named:
    """A process as describe() reads it: its command line."""

    def __init__(self, *words: str):
        self.words = list(words)

    def cmdline(self) -> list[str]:
        return self.words


def test_describe_names_what_each_process_does():
    assert describe(Named("ray::ServeReplica:es-ray:SearchAPI"))[0] == "ray::ServeReplica:es-ray:SearchAPI"
    assert "Serve replica" in describe(Named("ray::ServeReplica:es-ray:SearchAPI"))[1]
    assert "raylet" in describe(Named("/venv/lib/ray/core/src/ray/raylet/raylet", "--node_ip_address=x"))[1]
    assert "checkpointer" in describe(Named("postgres: checkpointer "))[1]
    assert describe(Named("postgres: es_ray es_ray [local] idle"))[1].startswith("PostgreSQL backend")
    stub = describe(Named("/s/triton_python_backend_stub", "/state/triton/models/query_encoder_v3/1/model.py"))
    assert stub[0] == "stub query_encoder_v3" and "stub" in stub[1]
    assert describe(Named("/usr/bin/something"))[1].startswith("not one es-ray names")
    # a dashboard module's title, whole or split at its spaces: the module is named, so memory and CPU
    # reports say which of the dashboard's processes it is
    for words in (["ray-dashboard-NodeHead-0 (/venv/bin/python -u dashboard.py)"],
                  ["ray-dashboard-NodeHead-0", "(/venv/bin/python", "-u", "dashboard.py)"]):
        name, role = describe(Named(*words))
        assert name == "ray-dashboard-NodeHead-0" and role.startswith("a module of Ray's dashboard")


def test_the_ray_data_actors_stopped_are_named_as_ray_names_them():
    """es_ray/data/ray_data_actors.py names the actors Ray 2.60's Ray Data creates; a Ray that renamed one
    would leave it running unnoticed, so the names are read back from Ray's source."""
    import inspect

    from ray.data._internal import stats
    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator
    from ray.data._internal.execution.node_trackers import actor_location

    from es_ray.data.ray_data_actors import ACTORS, STATS_ACTOR

    assert STATS_ACTOR == (stats.STATS_ACTOR_NAME, stats.STATS_ACTOR_NAMESPACE)
    made_by = {"AutoscalingCoordinator": default_autoscaling_coordinator.get_or_create_autoscaling_coordinator,
               "ActorLocationTracker": actor_location.get_or_create_actor_location_tracker}
    for name, namespace in ACTORS[1:]:
        source = inspect.getsource(made_by[name])
        assert f'name="{name}"' in source and f'namespace="{namespace}"' in source
        assert 'lifetime="detached"' in source   # the reason they outlive jobs; stopping them is still needed


def test_the_head_runs_without_a_log_monitor_unless_configured(stack, settings):
    """configs/stack.yaml `ray.log_monitor: false`: `ray start` leaves Ray's log monitor out (its idle cost:
    BENCHMARKS.md "Idle stack"); the rest of Ray's processes are there."""
    from pathlib import Path

    names = [describe(p)[0] for p in stack_processes(Path(stack.state_dir))]
    assert "raylet" in names and "gcs_server" in names
    assert ("log_monitor.py" in names) == settings.ray.log_monitor


def test_a_change_of_the_blue_pointer_reaches_a_watcher_by_notification(stack):
    """Replicas re-read the blue pointer when Postgres notifies a change (migration 0007), not by polling:
    with a refresh interval of minutes, only the notification can explain a read within seconds."""
    from es_ray.serve.blue_watcher import BlueWatcher
    from es_ray.store import db

    pool = db.open_pool(stack.postgres_dsn, 2)
    watcher = BlueWatcher(pool, stack.postgres_dsn, refresh_s=300)
    try:
        assert watcher.current is not None
        assert wait_for(lambda: watcher.reads >= 1, 10)   # its first read, once it listens
        reads = watcher.reads
        time.sleep(1.5)
        assert watcher.reads == reads                      # idle: nothing read between notifications
        with db.connect(stack.postgres_dsn) as conn:
            conn.execute("UPDATE blue SET epoch = epoch")  # changes nothing, notifies all the same
        assert wait_for(lambda: watcher.reads > reads, 5)
    finally:
        watcher.stop()
        pool.close()


def test_each_thread_shows_its_cpu_and_how_often_it_wakes():
    """The idle benchmark's per-thread view (es_ray/bench/idle.py `_threads`): a thread that computes shows
    its CPU, one that sleeps in short steps shows its wakeups and next to no CPU."""
    import os

    from es_ray.bench.idle import _threads

    ids: dict[str, int] = {}
    done = threading.Event()

    def compute():
        ids["compute"] = threading.get_native_id()
        started = time.thread_time()
        while time.thread_time() - started < 0.3:
            pass
        done.wait(10)

    def nap():
        ids["nap"] = threading.get_native_id()
        for _ in range(60):
            time.sleep(0.002)
        done.wait(10)

    workers = [threading.Thread(target=compute), threading.Thread(target=nap)]
    for worker in workers:
        worker.start()
    try:
        assert wait_for(lambda: len(ids) == 2)
        time.sleep(0.6)  # both done with their work, both still alive
        threads = _threads(os.getpid())
        _, compute_cpu, _ = threads[ids["compute"]]
        _, nap_cpu, nap_wakeups = threads[ids["nap"]]
        assert compute_cpu >= 0.25            # CPU counted in clock ticks (10 ms)
        assert nap_wakeups >= 60 and nap_cpu < 0.1
        assert threads[threading.get_native_id()][0]   # every thread has its name (comm) read
    finally:
        done.set()
        for worker in workers:
            worker.join()
