"""SQL for lifecycle state: registered models, collections, the blue pointer, green and switches.

The `blue` row holds three targets: blue (serves searches), green (being built for a new model) and
previous (the old blue, kept for rollback until `previous_until`). Every item write goes to all of them
in one transaction that holds the row FOR SHARE; a switch updates it FOR UPDATE, so no write can
commit to an old set of collections after a switch or after green appears.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class ModelRecord:
    version: int
    mlflow_uri: str
    source_dir: str
    dim: int
    max_length: int
    state: str = "registered"   # registered | deployed | retired; fine-tuned: candidate | rejected
    triton_grpc_url: str | None = None  # the version's own tritonserver (embedded stack); None: the stack's


@dataclass(frozen=True)
class Target:
    """A model version and the collection its vectors live in."""

    model_version: int
    collection: str
    dim: int
    source_dir: str
    max_length: int
    triton_grpc_url: str | None = None  # where its encoders are served; None: the stack's Triton


Blue = Target  # what serves traffic


@dataclass(frozen=True)
class State:
    blue: Target
    green: Target | None
    previous: Target | None
    previous_until: datetime | None
    epoch: int

    def write_targets(self) -> list[Target]:
        """Every collection an item write must reach, in name order (the order rows are locked in)."""
        targets = {t.collection: t for t in (self.blue, self.green, self.previous) if t is not None}
        return [targets[name] for name in sorted(targets)]


def get_state(conn: psycopg.Connection, lock: bool = False) -> State | None:
    """The lifecycle state; `lock` holds it FOR SHARE until the transaction ends (item writes).

    The row is locked first and read after: a `FOR SHARE OF b` on the join that waited for a switch
    re-checks the new blue row against the models row of its old snapshot, finds no match and returns
    nothing (Postgres's EvalPlanQual; seen as writes failing during a switch under load)."""
    if lock:
        conn.execute("SELECT epoch FROM blue FOR SHARE")
    row = conn.execute("""
        SELECT mb.version, b.collection, mb.dim, mb.source_dir, mb.max_length, mb.triton_grpc_url,
               mg.version, b.green_collection, mg.dim, mg.source_dir, mg.max_length, mg.triton_grpc_url,
               mp.version, b.previous_collection, mp.dim, mp.source_dir, mp.max_length, mp.triton_grpc_url,
               b.previous_until, b.epoch
        FROM blue b JOIN models mb ON mb.version = b.model_version
        LEFT JOIN models mg ON mg.version = b.green_version
        LEFT JOIN models mp ON mp.version = b.previous_version""").fetchone()
    if row is None:
        return None
    green = Target(*row[6:12]) if row[6] is not None else None
    previous = Target(*row[12:18]) if row[12] is not None else None
    return State(Target(*row[0:6]), green, previous, row[18], row[19])


def save_model(conn: psycopg.Connection, model: ModelRecord) -> None:
    conn.execute(
        """INSERT INTO models (version, mlflow_uri, source_dir, dim, max_length, state)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (version) DO UPDATE SET mlflow_uri = EXCLUDED.mlflow_uri, source_dir = EXCLUDED.source_dir,
               dim = EXCLUDED.dim, max_length = EXCLUDED.max_length, state = EXCLUDED.state""",
        (model.version, model.mlflow_uri, model.source_dir, model.dim, model.max_length, model.state))


def get_model(conn: psycopg.Connection, version: int) -> ModelRecord | None:
    row = conn.execute("""SELECT version, mlflow_uri, source_dir, dim, max_length, state, triton_grpc_url
                          FROM models WHERE version = %s""", (version,)).fetchone()
    return ModelRecord(*row) if row else None


def set_triton_address(conn: psycopg.Connection, version: int, grpc_url: str | None) -> None:
    """Records where the version's encoders answer (its own tritonserver), or None once it is stopped.
    Replicas hold blue with its address: they are told to read it again, as at a switch."""
    conn.execute("UPDATE models SET triton_grpc_url = %s WHERE version = %s", (grpc_url, version))
    conn.execute("SELECT pg_notify(%s, '')", (BLUE_CHANNEL,))


def save_collection(conn: psycopg.Connection, name: str, model_version: int, state: str) -> None:
    """Records a collection's state; one that starts `building` (again) has taught nobody's sessions yet."""
    conn.execute(
        """INSERT INTO collections (name, model_version, state) VALUES (%s, %s, %s)
           ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state,
               users_learned_since = CASE WHEN EXCLUDED.state = 'building' THEN NULL
                                          ELSE collections.users_learned_since END""", (name, model_version, state))


def hand_users_to_passes(conn: psycopg.Connection, name: str) -> datetime:
    """From now on the improvement passes teach users' sessions to this green collection themselves; the
    reindex replays what was counted before (lifecycle/reindex.py handed_over_evidence, which holds the
    collection's improvement lock meanwhile). The first moment is kept if a resumed reindex sets it again."""
    return conn.execute("""UPDATE collections SET users_learned_since = COALESCE(users_learned_since, clock_timestamp())
                           WHERE name = %s RETURNING users_learned_since""", (name,)).fetchone()[0]


def users_learned_since(conn: psycopg.Connection, name: str) -> datetime | None:
    row = conn.execute("SELECT users_learned_since FROM collections WHERE name = %s", (name,)).fetchone()
    return row[0] if row else None


BLUE_CHANNEL = "es_ray_blue"  # notified at every change of the blue row (migration 0007_blue_notify.sql)


def get_blue(conn: psycopg.Connection) -> Blue | None:
    state = get_state(conn)
    return state.blue if state else None


def get_collection(conn: psycopg.Connection, name: str) -> dict | None:
    row = conn.execute("SELECT name, model_version, state, created_at FROM collections WHERE name = %s",
                       (name,)).fetchone()
    return {"name": row[0], "model_version": row[1], "state": row[2], "created_at": row[3]} if row else None


def set_model_state(conn: psycopg.Connection, version: int, state: str) -> None:
    conn.execute("UPDATE models SET state = %s WHERE version = %s", (state, version))


def set_green(conn: psycopg.Connection, version: int | None, collection: str | None) -> None:
    """Starts (or, with None, stops) dual writes to a green collection. Waits for writes in flight."""
    with conn.transaction():
        conn.execute("SELECT 1 FROM blue FOR UPDATE")
        conn.execute("UPDATE blue SET green_version = %s, green_collection = %s", (version, collection))


def stop_green(conn: psycopg.Connection, collection: str) -> bool:
    """Stops dual writes to this green collection (it is about to be dropped); False if green is another."""
    with conn.transaction():
        conn.execute("SELECT 1 FROM blue FOR UPDATE")
        return conn.execute("""UPDATE blue SET green_version = NULL, green_collection = NULL
                               WHERE green_collection = %s""", (collection,)).rowcount == 1


def previous_due(conn: psycopg.Connection, now: bool, margin_s: float) -> bool:
    """The previous blue's grace period is over (`now`: it was switched from at least `margin_s` ago)."""
    return conn.execute("""SELECT previous_until <= now() OR (%s AND switched_at < now() - make_interval(secs => %s))
                           FROM blue""", (now, margin_s)).fetchone()[0]


def gate_passed(conn: psycopg.Connection, version: int) -> bool:
    """A fine-tuned version the quality gate accepted (state candidate, gate.candidate true)."""
    row = conn.execute("SELECT state, gate FROM models WHERE version = %s", (version,)).fetchone()
    return bool(row and (row[1] or {}).get("candidate") and row[0] != "rejected")


# --- switches ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Switch:
    switch_id: str
    kind: str
    from_version: int
    from_collection: str
    to_version: int
    to_collection: str
    status: str
    forced: bool
    reason: str | None
    started_at: datetime
    finished_at: datetime | None

    def as_dict(self) -> dict:
        """JSON-ready (task results, HTTP answers)."""
        return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in self.__dict__.items()}


SWITCH_COLUMNS = ("switch_id, kind, from_version, from_collection, to_version, to_collection, status, forced, reason, "
                  "started_at, finished_at")


def switch_id_for(kind: str, idempotency_key: str) -> str:
    """The switch id a call with this idempotency key records: a retried call finds the first one's row."""
    return hashlib.sha256(f"{kind}\n{idempotency_key}".encode()).hexdigest()[:32]


def begin_switch(conn: psycopg.Connection, kind: str, frm: Target, to: Target, forced: bool,
                 switch_id: str | None = None) -> Switch:
    """Records the intent before anything changes (kind: switch | rollback); `switch_id` from
    `switch_id_for` when the call carries an idempotency key."""
    switch_id = switch_id or uuid.uuid4().hex
    conn.execute("""INSERT INTO switches (switch_id, kind, from_version, from_collection, to_version, to_collection,
                                           forced) VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                 (switch_id, kind, frm.model_version, frm.collection, to.model_version, to.collection, forced))
    return get_switch(conn, switch_id)


def get_switch(conn: psycopg.Connection, switch_id: str) -> Switch:
    return Switch(*conn.execute(f"SELECT {SWITCH_COLUMNS} FROM switches WHERE switch_id = %s", (switch_id,)).fetchone())


def find_switch(conn: psycopg.Connection, switch_id: str) -> Switch | None:
    row = conn.execute(f"SELECT {SWITCH_COLUMNS} FROM switches WHERE switch_id = %s", (switch_id,)).fetchone()
    return Switch(*row) if row else None


def unfinished_switches(conn: psycopg.Connection) -> list[Switch]:
    return [Switch(*r) for r in conn.execute(
        f"SELECT {SWITCH_COLUMNS} FROM switches WHERE status = 'started' ORDER BY started_at")]


def recent_switches(conn: psycopg.Connection, limit: int = 10) -> list[Switch]:
    return [Switch(*r) for r in conn.execute(
        f"SELECT {SWITCH_COLUMNS} FROM switches ORDER BY started_at DESC LIMIT %s", (limit,))]


def complete_switch(conn: psycopg.Connection, switch: Switch, grace_s: float) -> Switch:
    """Moves blue from `from` to `to` in one transaction, only if blue is still `from` (compare and
    swap): the switch happens once or not at all. The old blue becomes `previous` until the grace
    period ends; a switch to green clears green, a rollback to previous clears previous."""
    with conn.transaction():
        row = conn.execute("SELECT collection, green_collection, previous_collection FROM blue FOR UPDATE").fetchone()
        status = conn.execute("SELECT status FROM switches WHERE switch_id = %s FOR UPDATE",
                              (switch.switch_id,)).fetchone()[0]
        if status != "started":
            return get_switch(conn, switch.switch_id)
        expected_to = row[1] if switch.kind == "switch" else row[2]
        if row[0] != switch.from_collection or expected_to != switch.to_collection:
            conn.execute("""UPDATE switches SET status = 'aborted', finished_at = now(), reason = %s
                            WHERE switch_id = %s""",
                         (f"blue is {row[0]}, green {row[1]}, previous {row[2]}: the state moved on", switch.switch_id))
            return get_switch(conn, switch.switch_id)
        # A switch consumes green; a rollback leaves green as it is.
        keep_green = switch.kind == "rollback"
        conn.execute("""UPDATE blue SET model_version = %s, collection = %s, previous_version = %s,
                            previous_collection = %s, previous_until = now() + make_interval(secs => %s),
                            green_version = CASE WHEN %s THEN green_version END,
                            green_collection = CASE WHEN %s THEN green_collection END,
                            epoch = epoch + 1, switched_at = now()""",
                     (switch.to_version, switch.to_collection, switch.from_version, switch.from_collection, grace_s,
                      keep_green, keep_green))
        conn.execute("UPDATE switches SET status = 'switched', finished_at = now() WHERE switch_id = %s",
                     (switch.switch_id,))
        conn.execute("UPDATE collections SET state = 'ready' WHERE name = %s", (switch.to_collection,))
        conn.execute("UPDATE models SET state = 'deployed' WHERE version = %s", (switch.to_version,))
    return get_switch(conn, switch.switch_id)


def abort_switch(conn: psycopg.Connection, switch_id: str, reason: str) -> None:
    conn.execute("""UPDATE switches SET status = 'aborted', finished_at = now(), reason = %s
                    WHERE switch_id = %s AND status = 'started'""", (reason, switch_id))


def clear_previous(conn: psycopg.Connection, collection: str) -> bool:
    """Stops dual writes to the previous collection (before it is dropped); False if it changed."""
    with conn.transaction():
        conn.execute("SELECT 1 FROM blue FOR UPDATE")
        return conn.execute("""UPDATE blue SET previous_version = NULL, previous_collection = NULL,
                                   previous_until = NULL WHERE previous_collection = %s""",
                            (collection,)).rowcount == 1


def unreferenced_ready(conn: psycopg.Connection) -> list[str]:
    """Ready collections neither blue, green nor previous points to: a switch's displaced previous blue
    whose driver died between the swap and the drop (dropped by the next cleanup)."""
    return [r[0] for r in conn.execute("""
        SELECT c.name FROM collections c, blue b
        WHERE c.state = 'ready' AND c.name <> b.collection AND c.name IS DISTINCT FROM b.green_collection
          AND c.name IS DISTINCT FROM b.previous_collection ORDER BY c.name""")]


def set_blue(conn: psycopg.Connection, model_version: int, collection: str) -> None:
    conn.execute(
        """INSERT INTO blue (singleton, model_version, collection) VALUES (true, %s, %s)
           ON CONFLICT (singleton) DO UPDATE SET model_version = EXCLUDED.model_version,
               collection = EXCLUDED.collection, switched_at = now()""", (model_version, collection))


def record_lineage(conn: psycopg.Connection, version: int, parent_version: int, metrics: dict,
                   gate: dict) -> None:
    """A fine-tuned version's parent, held-out metrics and quality-gate decision."""
    conn.execute("UPDATE models SET parent_version = %s, metrics = %s, gate = %s WHERE version = %s",
                 (parent_version, Jsonb(metrics), Jsonb(gate), version))


def list_models(conn: psycopg.Connection) -> list[dict]:
    rows = conn.execute("""SELECT version, state, parent_version, metrics, gate, created_at FROM models
                           ORDER BY version""").fetchall()
    return [{"version": r[0], "state": r[1], "parent_version": r[2], "metrics": r[3], "gate": r[4],
             "created_at": r[5]} for r in rows]


def move_source_dirs(conn: psycopg.Connection, old_prefix: str, new_prefix: str) -> int:
    """Points models' local encoder copies from `old_prefix` to `new_prefix` (a restore into another state
    dir); directories outside `old_prefix` stay. Returns the rows changed."""
    old, new = old_prefix.rstrip("/") + "/", new_prefix.rstrip("/") + "/"
    return conn.execute("""UPDATE models SET source_dir = %s || substr(source_dir, length(%s) + 1)
                           WHERE starts_with(source_dir, %s)""", (new, old, old)).rowcount
