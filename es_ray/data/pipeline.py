"""The upsert pipeline: items -> chunks -> token ids -> Triton (item encoder) -> vectors -> COPY.

The same steps run in the Serve replica for HTTP bodies (`upsert_now`) and as a Ray Data stage for bulk
loads (`upsert_dataset`, es_ray/data/upsert.py): `UpsertStage` actors call Triton and write with COPY, and
report per-item failures, so one bad batch never stops a load. Writes go to every live collection
(data/dual_write.py), each embedded by its own model.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from typing import Any, Iterator

import numpy as np

from es_ray.config import Settings
from es_ray.inference.triton_client import RecentEncoders, TritonEncoder, grpc_address
from es_ray.inference.triton_repo import ITEM_ENCODER
from es_ray.data.dual_write import write_items
from es_ray.logs import get_logger
from es_ray.priority import run_as_batch
from es_ray.store import db
from es_ray.store.collections import EmbeddedItem
from es_ray.store.blue_green import Target

log = get_logger(__name__)


def item_encoder(settings: Settings, grpc_url: str, blue: Target) -> TritonEncoder:
    """The item encoder of a collection's model, sending upsert.rows_per_request chunk rows a request."""
    return TritonEncoder.of(grpc_url, ITEM_ENCODER, blue, settings, settings.upsert.rows_per_request)


def embed(encoder: TritonEncoder, settings: Settings, ids: list[str], texts: list[str],
          payloads: list[dict[str, Any]]) -> list[EmbeddedItem]:
    chunks, vectors = encoder.embed_chunks(texts, settings.model.chunk_overlap, settings.model.max_chunks)
    items = []
    for i, item_id in enumerate(ids):
        rows = vectors[chunks.owner == i]
        source = {"chunks": int(len(rows)), "truncated": chunks.truncated[i], "chars": len(texts[i]),
                  "text_sha256": hashlib.sha256(texts[i].encode()).hexdigest()}
        items.append(EmbeddedItem(id=item_id, payload=payloads[i], chunks=rows, source=source, text=texts[i]))
    return items


class Encoders:
    """Item-encoder clients by model version, made on first use (those of the versions used lately)."""

    def __init__(self, settings: Settings, grpc_url: str):
        self.settings, self.grpc_url, self._clients = settings, grpc_url, RecentEncoders()

    def embed_for(self, target: Target, items: list[dict[str, Any]]) -> list[EmbeddedItem]:
        address = grpc_address(target, self.grpc_url)  # a redeployed version moves
        client = self._clients.get(target.model_version, address, lambda: item_encoder(self.settings, self.grpc_url, target))
        return embed(client, self.settings, [i["id"] for i in items], [i["text"] for i in items],
                     [i["payload"] for i in items])


def upsert_now(encoders: Encoders, pool, settings: Settings,
               items: list[dict[str, Any]]) -> tuple[int, list[dict[str, str]]]:
    """Embeds and writes in batches of upsert.batch_size; a failing batch is reported, the rest kept.
    A pooled connection is taken only to read the live collections and to write, never while Triton
    embeds (data/dual_write.py): the pool is sized to the requests in flight, not to Triton's latency."""
    written, failed = 0, []
    size = settings.upsert.batch_size
    for start in range(0, len(items), size):
        batch = items[start:start + size]
        ids = [i["id"] for i in batch]
        try:
            written += write_items(pool.connection, batch, encoders.embed_for, settings.retries.write)
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


class UpsertStage:
    """Actor-pool stage: embeds each batch with the model of every live collection (read per batch, so a
    long load follows a switch) and writes it to all of them with COPY, as `upsert_now` does; outputs one
    (id, error) row per item, so one failed batch never stops a load.

    Embedding and writing in one actor (there were two stages, the vectors pickled through Ray's object
    store to a write actor) saves a worker process: on 2 cores every process a job starts is paid in the
    job's start, about 1.5 s of a core each (BENCHMARKS.md, "One upsert stage, the arena shrunk once
    idle"). The writes overlap Triton anyway: while one actor writes, the other's requests keep the item
    encoder's instances busy."""

    def __init__(self, settings: dict[str, Any], grpc_url: str, dsn: str):
        self.settings = Settings.model_validate(settings)
        run_as_batch(self.settings.ray.batch_nice)
        self.encoders = Encoders(self.settings, grpc_url)
        self.conn = db.connect(dsn)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        items = [{"id": str(i), "text": str(t), "payload": json.loads(p)}
                 for i, t, p in zip(batch["id"], batch["text"], batch["payload_json"])]
        ids = [i["id"] for i in items]
        try:
            write_items(lambda: nullcontext(self.conn), items, self.encoders.embed_for, self.settings.retries.write)
        except Exception as err:  # noqa: BLE001 - reported per item, never swallowed silently
            log.warning("upsert.batch_failed", items=len(items), error=str(err))
            return {"id": ids, "error": [f"{type(err).__name__}: {err}"] * len(ids)}
        return {"id": ids, "error": [""] * len(ids)}


def upsert_dataset(dataset, settings: Settings, grpc_url: str, dsn: str) -> Iterator[dict[str, list]]:
    """Runs embed + write over a Ray Dataset with id/text/payload_json columns; yields result batches."""
    import ray.data

    args = (settings.model_dump(mode="json"), grpc_url, dsn)
    # An actor task takes whole blocks, and a JSON-lines file of a few MB is read as a handful of blocks
    # that parsing merges into one: every item went to one actor in one task (the others idle). Blocks of
    # one batch each spread the batches over the pool, and each is written as soon as it is embedded (a
    # streaming split: no barrier, no shuffle).
    dataset = dataset.repartition(target_num_rows_per_block=settings.upsert.batch_size)
    written = dataset.map_batches(
        UpsertStage, fn_constructor_args=args, batch_size=settings.upsert.batch_size,
        compute=ray.data.ActorPoolStrategy(size=settings.upsert.encoders),
        num_cpus=0.25)  # the model runs in Triton; these actors tokenise, wait on the network and COPY
    yield from written.iter_batches(batch_size=None, batch_format="numpy")
