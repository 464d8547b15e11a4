"""The upsert pipeline: items -> chunks -> token ids -> Triton (item encoder) -> vectors -> COPY.

The same two stages run in-process for small HTTP bodies (`upsert_now`) and as Ray Data stages for
bulk loads and large bodies (`upsert_dataset`): `EmbedStage` calls Triton from an actor pool,
`WriteStage` writes with COPY and reports per-item failures, so one bad batch never stops a load.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import numpy as np

from es_ray.config import Settings
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import ITEM_ENCODER
from es_ray.logs import get_logger
from es_ray.store import db
from es_ray.store.collections import Collection, EmbeddedItem
from es_ray.store.lifecycle import Blue

log = get_logger(__name__)


def item_encoder(settings: Settings, grpc_url: str, blue: Blue) -> TritonEncoder:
    return TritonEncoder(grpc_url, ITEM_ENCODER, blue.model_version, blue.source_dir, blue.max_length,
                         settings.triton.max_batch_size, settings.triton.timeout_s)


def embed(encoder: TritonEncoder, settings: Settings, ids: list[str], texts: list[str],
          payloads: list[dict[str, Any]]) -> list[EmbeddedItem]:
    chunks, vectors = encoder.embed_chunks(texts, settings.model.chunk_overlap, settings.model.max_chunks)
    items = []
    for i, item_id in enumerate(ids):
        rows = vectors[chunks.owner == i]
        source = {"chunks": int(len(rows)), "truncated": chunks.truncated[i], "chars": len(texts[i]),
                  "text_sha256": hashlib.sha256(texts[i].encode()).hexdigest()}
        items.append(EmbeddedItem(id=item_id, payload=payloads[i], chunks=rows, source=source))
    return items


def upsert_now(encoder: TritonEncoder, pool, collection: Collection, settings: Settings,
               items: list[dict[str, Any]]) -> tuple[int, list[dict[str, str]]]:
    """Embeds and writes in batches of upsert.batch_size; a failing batch is reported, the rest kept."""
    written, failed = 0, []
    size = settings.upsert.batch_size
    for start in range(0, len(items), size):
        batch = items[start:start + size]
        ids = [i["id"] for i in batch]
        try:
            embedded = embed(encoder, settings, ids, [i["text"] for i in batch], [i["payload"] for i in batch])
            with pool.connection() as conn:
                written += collection.upsert(conn, embedded)
        except Exception as err:  # noqa: BLE001 - reported per item, never swallowed silently
            log.warning("upsert.batch_failed", items=len(batch), error=str(err))
            failed.extend({"id": item_id, "error": f"{type(err).__name__}: {err}"} for item_id in ids)
    return written, failed


# --- Ray Data stages ------------------------------------------------------------------------------

def parse_jsonl(batch: dict[str, np.ndarray]) -> dict[str, list]:
    """read_text lines -> id/text/payload_json columns (payload as JSON text: its keys vary per item)."""
    from es_ray.data.corpus import beir_item

    out: dict[str, list] = {"id": [], "text": [], "payload_json": []}
    for line in batch["text"]:
        if not line.strip():
            continue
        record = json.loads(line)
        item = beir_item(record) if "_id" in record else record
        out["id"].append(str(item["id"]))
        out["text"].append(item["text"])
        out["payload_json"].append(json.dumps(item.get("payload") or {}))
    return out


class EmbedStage:
    """Actor-pool stage: one Triton client per actor; outputs vectors as float32 bytes per item."""

    def __init__(self, settings: dict[str, Any], grpc_url: str, blue: dict[str, Any]):
        self.settings = Settings.model_validate(settings)
        self.encoder = item_encoder(self.settings, grpc_url, Blue(**blue))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        ids, texts = [str(i) for i in batch["id"]], [str(t) for t in batch["text"]]
        out: dict[str, list] = {"id": ids, "payload_json": list(batch["payload_json"]), "vectors": [],
                                "n_chunks": [], "source_json": [], "error": []}
        try:
            items = embed(self.encoder, self.settings, ids, texts, [{}] * len(ids))
            for item in items:
                out["vectors"].append(item.chunks.astype(np.float32).tobytes())
                out["n_chunks"].append(len(item.chunks))
                out["source_json"].append(json.dumps(item.source))
                out["error"].append("")
        except Exception as err:  # noqa: BLE001 - recorded per item by the write stage
            message = f"embed: {type(err).__name__}: {err}"
            for _ in ids:
                out["vectors"].append(b"")
                out["n_chunks"].append(0)
                out["source_json"].append("{}")
                out["error"].append(message)
        return out


class WriteStage:
    """Actor-pool stage: COPY into the collection; outputs one (id, error) row per item."""

    def __init__(self, dsn: str, collection: str, dim: int):
        self.conn = db.connect(dsn)
        self.collection = Collection(collection, dim)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        ids = [str(i) for i in batch["id"]]
        errors = [str(e) for e in batch["error"]]
        items = []
        for k, item_id in enumerate(ids):
            if errors[k]:
                continue
            vectors = np.frombuffer(batch["vectors"][k], dtype=np.float32).reshape(int(batch["n_chunks"][k]), -1)
            items.append(EmbeddedItem(id=item_id, payload=json.loads(batch["payload_json"][k]), chunks=vectors,
                                      source=json.loads(batch["source_json"][k])))
        try:
            self.collection.upsert(self.conn, items)
        except Exception as err:  # noqa: BLE001
            errors = [e or f"write: {type(err).__name__}: {err}" for e in errors]
        return {"id": ids, "error": errors}


def upsert_dataset(dataset, settings: Settings, grpc_url: str, dsn: str, blue: Blue) -> Iterator[dict[str, list]]:
    """Runs embed + write over a Ray Dataset with id/text/payload_json columns; yields result batches."""
    import ray.data

    embedded = dataset.map_batches(
        EmbedStage, fn_constructor_args=(settings.model_dump(mode="json"), grpc_url, blue.__dict__),
        batch_size=settings.upsert.batch_size, compute=ray.data.ActorPoolStrategy(size=settings.upsert.encoders),
        num_cpus=0.25)  # the model runs in Triton; these actors tokenise and wait on the network
    written = embedded.map_batches(
        WriteStage, fn_constructor_args=(dsn, blue.collection, blue.dim), batch_size=settings.upsert.write_batch_items,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25)
    yield from written.iter_batches(batch_size=None, batch_format="numpy")
