"""The promoted fusion of each collection (table fusion_weights, migration 0010): written when the
click-learned fusion passes the gate (train/fusion_weights.py), read by every replica with the blue
pointer (serve/blue_watcher.py), so a search reads nothing more."""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from es_ray.store.fusion import Fusion


def promote(conn: psycopg.Connection, collection: str, fusion: Fusion, replaces: Fusion | None,
            mlflow_run_id: str | None, mlflow_version: int | None, gate: dict) -> bool:
    """Serves `fusion` (RRF) for `collection` from this transaction's commit on, but only if the collection
    still serves `replaces`, the fusion the gate compared it with (None: the configured one, no row).
    False when another learner promoted a fusion meanwhile: this one was never compared with it."""
    values = (fusion.k, fusion.dense_weight, fusion.lexical_weight, mlflow_run_id, mlflow_version, Jsonb(gate))
    if replaces is None:
        cursor = conn.execute(
            """INSERT INTO fusion_weights (collection, k, dense_weight, lexical_weight, mlflow_run_id, mlflow_version,
                                           gate)
               VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (collection) DO NOTHING""", (collection, *values))
    else:
        cursor = conn.execute(
            """UPDATE fusion_weights SET k = %s, dense_weight = %s, lexical_weight = %s, mlflow_run_id = %s,
                   mlflow_version = %s, gate = %s, promoted_at = now()
               WHERE collection = %s AND k = %s AND dense_weight = %s AND lexical_weight = %s""",
            (*values, collection, replaces.k, replaces.dense_weight, replaces.lexical_weight))
    return cursor.rowcount == 1


def forget(conn: psycopg.Connection, collection: str) -> None:
    """Back to the configured fusion for `collection`."""
    conn.execute("DELETE FROM fusion_weights WHERE collection = %s", (collection,))


def learned(conn: psycopg.Connection) -> dict[str, Fusion]:
    """collection -> its promoted fusion (a row per collection that has one: a handful)."""
    return {name: Fusion("rrf", k, dense, lexical) for name, k, dense, lexical in
            conn.execute("SELECT collection, k, dense_weight, lexical_weight FROM fusion_weights")}


def record(conn: psycopg.Connection, collection: str) -> dict | None:
    """The collection's promoted fusion and where it came from (`es-ray status`); None: the configured one."""
    row = conn.execute("SELECT k, dense_weight, lexical_weight, mlflow_run_id, mlflow_version, promoted_at "
                       "FROM fusion_weights WHERE collection = %s", (collection,)).fetchone()
    return None if row is None else {"rrf_k": row[0], "dense_weight": row[1], "lexical_weight": row[2],
                                     "mlflow_run_id": row[3], "mlflow_version": row[4],
                                     "promoted_at": row[5].isoformat()}
