"""The promoted fusion of each collection (table fusion_weights, migration 0010): written when the
click-learned fusion passes the gate (train/fusion_weights.py), read by every replica with the blue
pointer (serve/blue_watcher.py), so a search reads nothing more."""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from es_ray.store.fusion import Fusion


def promote(conn: psycopg.Connection, collection: str, fusion: Fusion, mlflow_run_id: str | None, gate: dict) -> None:
    """Serves `fusion` (RRF) for `collection` from this transaction's commit on."""
    conn.execute(
        """INSERT INTO fusion_weights (collection, k, dense_weight, lexical_weight, mlflow_run_id, gate)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (collection) DO UPDATE SET k = EXCLUDED.k, dense_weight = EXCLUDED.dense_weight,
               lexical_weight = EXCLUDED.lexical_weight, mlflow_run_id = EXCLUDED.mlflow_run_id,
               gate = EXCLUDED.gate, promoted_at = now()""",
        (collection, fusion.k, fusion.dense_weight, fusion.lexical_weight, mlflow_run_id, Jsonb(gate)))


def forget(conn: psycopg.Connection, collection: str) -> None:
    """Back to the configured fusion for `collection`."""
    conn.execute("DELETE FROM fusion_weights WHERE collection = %s", (collection,))


def learned(conn: psycopg.Connection) -> dict[str, Fusion]:
    """collection -> its promoted fusion (a row per collection that has one: a handful)."""
    return {name: Fusion("rrf", k, dense, lexical) for name, k, dense, lexical in
            conn.execute("SELECT collection, k, dense_weight, lexical_weight FROM fusion_weights")}


def record(conn: psycopg.Connection, collection: str) -> dict | None:
    row = conn.execute("SELECT k, dense_weight, lexical_weight, mlflow_run_id, gate, promoted_at FROM fusion_weights "
                       "WHERE collection = %s", (collection,)).fetchone()
    return None if row is None else {"rrf_k": row[0], "dense_weight": row[1], "lexical_weight": row[2],
                                     "mlflow_run_id": row[3], "gate": row[4], "promoted_at": row[5].isoformat()}
