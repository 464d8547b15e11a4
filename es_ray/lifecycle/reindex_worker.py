"""The reindex's Ray Data stage: one key range per call, read (blue) -> embed (Triton, new model) -> write
(green), or blue's model vectors copied where the new version keeps blue's item tower.

A module of its own, apart from the job (es_ray/lifecycle/reindex.py), because a Ray actor imports the
module its class is defined in: the job's module pulls in the improvement loop and the encoder, hence
torch, and every worker of the pool paid about a second of a core to import it before its first range.
This one imports only what a worker runs: the Triton client (token ids out, vectors back), the
tokenizer and the store.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import psutil
import ray

from es_ray import retries
from es_ray.config import Settings
from es_ray.data.pipeline import embed
from es_ray.inference.triton_client import TritonEncoder
from es_ray.inference.triton_repo import ITEM_ENCODER
from es_ray.logs import get_logger
from es_ray.priority import run_as_batch
from es_ray.store import db, reindex_ranges
from es_ray.store.blue_green import Target
from es_ray.store.collections import Collection, EmbeddedItem

log = get_logger(__name__)


class ReindexWorker:
    """Actor-pool stage, one key range per call: read (blue) -> embed (Triton, new model) -> write (green).
    With `copy_vectors` (the new version's item tower is blue's) the model's vectors are copied instead
    of computed again: the same items, versions and checkpoints, no forward pass."""

    def __init__(self, settings: dict[str, Any], grpc_url: str, dsn: str, source: dict[str, Any],
                 green: dict[str, Any], task_id: str, copy_vectors: bool = False):
        started = time.monotonic()
        self.settings = Settings.model_validate(settings)
        run_as_batch(self.settings.ray.batch_nice)
        self.source, self.green = Target(**source), Target(**green)
        self.copy_vectors = copy_vectors
        # Small requests with a patient deadline: the writes and searches served meanwhile share Triton's
        # queue and must not wait behind big batches; a reindex can wait.
        self.encoder = None if copy_vectors else TritonEncoder.of(
            grpc_url, ITEM_ENCODER, self.green, self.settings, self.settings.reindex.rows_per_request,
            self.settings.reindex.embed_timeout_s)
        self.conn = db.connect(dsn)
        self.task_id = task_id
        # Reported per range: where the work ran. Outside Ray (a test calling the stage directly) there is
        # no node, and asking the runtime context would start a whole local Ray instance.
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        log.info("reindex.worker_ready", init_s=round(time.monotonic() - started, 2),
                 process_age_s=round(time.time() - psutil.Process().create_time(), 2))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"range_no": [], "items": [], "written": [], "failed": [], "node_id": []}
        for k, range_no in enumerate(batch["range_no"]):
            after, last = batch["after_id"][k], batch["last_id"][k]
            items, written, failed = self.reindex_range(int(range_no), after or None, last or None)
            for key, value in (("range_no", int(range_no)), ("items", items), ("written", written), ("failed", failed),
                               ("node_id", self.node_id)):
                out[key].append(value)
        return out

    def reindex_range(self, range_no: int, after: str | None, last: str | None) -> tuple[int, int, int]:
        started = time.monotonic()
        source = Collection(self.source.collection, self.source.dim)
        green = Collection(self.green.collection, self.green.dim)
        stored = source.read_range(self.conn, after, last)
        if self.copy_vectors:  # vectors copied: no text needed
            return self.copy_range(source, green, stored, range_no)
        read_at = time.monotonic()
        failed = [(i.id, "read", "no stored text: the item was written before es-ray kept texts; upsert it again")
                  for i in stored if i.text is None]
        todo = [i for i in stored if i.text is not None]
        embedded: list[EmbeddedItem] = []
        size = self.settings.reindex.batch_size
        embed_retried = retries.retrying(self.settings.retries.embed, "reindex.embed")
        for start in range(0, len(todo), size):
            part = todo[start:start + size]
            try:
                embedded += embed_retried(embed, self.encoder, self.settings, [i.id for i in part],
                                          [i.text for i in part], [i.payload for i in part])
            except Exception as err:  # noqa: BLE001 - after the last try: recorded per item (a later pass retries)
                failed += [(i.id, "embed", f"{type(err).__name__}: {err}") for i in part]
        embedded_at = time.monotonic()
        outcome = self.finish(green, embedded, stored, failed, range_no)
        # One line per range: where a range's time goes (the job's progress only counts ranges).
        log.info("reindex.range_done", range_no=range_no, items=len(stored), failed=outcome[2],
                 read_s=round(read_at - started, 2), embed_s=round(embedded_at - read_at, 2),
                 write_s=round(time.monotonic() - embedded_at, 2))
        return outcome

    def copy_range(self, source: Collection, green: Collection, stored: list, range_no: int) -> tuple[int, int, int]:
        """The range's items with the model's own chunk vectors (before click memories: those are derived
        again for green at the end)."""
        vectors = source.chunk_vectors(self.conn, [i.id for i in stored], model=True)
        copies = [EmbeddedItem(id=i.id, payload=i.payload, source=i.source, text=i.text,
                               chunks=np.stack([v for _, v in vectors[i.id]]))
                  for i in stored if vectors.get(i.id)]
        failed = [(i.id, "read", "no vectors stored for this item") for i in stored if not vectors.get(i.id)]
        return self.finish(green, copies, stored, failed, range_no)

    def finish(self, green: Collection, items: list[EmbeddedItem], stored: list, failed: list[tuple[str, str, str]],
               range_no: int) -> tuple[int, int, int]:
        """Writes the range (`write`); where the write itself fails, every item of the range is recorded
        as failed. Returns (items read, written, failed)."""
        try:
            written = self.write(green, items, {i.id: i.version for i in stored}, failed, range_no, len(stored))
        except Exception as err:  # noqa: BLE001
            failed = [(i.id, "write", f"{type(err).__name__}: {err}") for i in stored]
            reindex_ranges.record_failures(self.conn, green.name, self.task_id, failed)
            written = 0
        return len(stored), written, len(failed)

    def write(self, green: Collection, embedded: list[EmbeddedItem], versions: dict[str, int],
              failed: list[tuple[str, str, str]], range_no: int, n_items: int) -> int:
        """Writes the range's copies, its failures and (if none failed) its checkpoint in one transaction;
        tried again (`retries.reindex_write`) when Postgres breaks a deadlock with a concurrent dual write by
        aborting this one."""

        def attempt() -> int:
            with self.conn.transaction():
                written = green.upsert(self.conn, embedded, versions)
                reindex_ranges.clear_failures(self.conn, green.name, [i.id for i in embedded])
                reindex_ranges.record_failures(self.conn, green.name, self.task_id, failed)
                if not failed:
                    reindex_ranges.mark_done(self.conn, green.name, range_no, n_items)
            return written

        return retries.retrying(self.settings.retries.reindex_write, "reindex.write")(attempt)
