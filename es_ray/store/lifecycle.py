"""SQL for lifecycle state: registered models, collections and the blue pointer."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Blue:
    """What serves traffic: a model version and the collection its vectors live in."""

    model_version: int
    collection: str
    dim: int
    source_dir: str
    max_length: int


def save_model(conn: psycopg.Connection, model: ModelRecord) -> None:
    conn.execute(
        """INSERT INTO models (version, mlflow_uri, source_dir, dim, max_length, state)
           VALUES (%s, %s, %s, %s, %s, %s)
           ON CONFLICT (version) DO UPDATE SET mlflow_uri = EXCLUDED.mlflow_uri, source_dir = EXCLUDED.source_dir,
               dim = EXCLUDED.dim, max_length = EXCLUDED.max_length, state = EXCLUDED.state""",
        (model.version, model.mlflow_uri, model.source_dir, model.dim, model.max_length, model.state))


def get_model(conn: psycopg.Connection, version: int) -> ModelRecord | None:
    row = conn.execute("SELECT version, mlflow_uri, source_dir, dim, max_length, state FROM models WHERE version = %s",
                       (version,)).fetchone()
    return ModelRecord(*row) if row else None


def save_collection(conn: psycopg.Connection, name: str, model_version: int, state: str) -> None:
    conn.execute(
        """INSERT INTO collections (name, model_version, state) VALUES (%s, %s, %s)
           ON CONFLICT (name) DO UPDATE SET state = EXCLUDED.state""", (name, model_version, state))


def get_blue(conn: psycopg.Connection) -> Blue | None:
    row = conn.execute(
        """SELECT b.model_version, b.collection, m.dim, m.source_dir, m.max_length
           FROM blue b JOIN models m ON m.version = b.model_version""").fetchone()
    return Blue(*row) if row else None


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
