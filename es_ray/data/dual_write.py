"""Item writes reach every live collection: blue, green while it is built, previous during the
rollback grace period.

One write is one transaction over all of them, holding the lifecycle row FOR SHARE, with one version
per item shared by every copy. A switch (or green appearing) takes that row FOR UPDATE, so it waits
for writes in flight and every later write sees the new set of collections. A reindex copies items
with the version it read; `Collection.upsert` keeps whichever copy is newer and deletes leave
tombstones, so an older copy can neither overwrite a newer write nor bring a deleted item back.

Writes take a connection only to read the live collections and for the transaction itself, never
while an embedding runs: a pooled connection held through a Triton call would make every other
request of the replica wait for Triton too.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager

import psycopg
import tenacity

from es_ray import retries
from es_ray.config import RetryPolicy
from es_ray.store import blue_green
from es_ray.store.collections import Collection, EmbeddedItem, next_versions
from es_ray.store.blue_green import Target

# (target, items as dicts with id/text/payload) -> the items embedded by the target's model
EmbedFor = Callable[[Target, list[dict[str, Any]]], list[EmbeddedItem]]
# () -> a connection for the time of a `with` block: `pool.connection`, or `lambda: nullcontext(conn)`
Connect = Callable[[], ContextManager[psycopg.Connection]]


class LifecycleMoved(RuntimeError):
    """The set of collections kept changing while the write was embedding; retry later."""


def live_targets(connect: Connect) -> list[Target]:
    with connect() as conn:
        return blue_green.get_state(conn).write_targets()


def embed_for_live(connect: Connect, items: list[dict[str, Any]], embed_for: EmbedFor,
                   embedded: dict[int, list[EmbeddedItem]]) -> dict[int, list[EmbeddedItem]]:
    """Adds the embeddings of every live collection's model that `embedded` lacks, holding no connection
    while the models run. A collection dropped (and its model unloaded) after the state was read is
    skipped: an embedding it fails is not needed, since the write transaction reads the live collections
    again."""
    for target in live_targets(connect):
        if target.model_version not in embedded:
            try:
                embedded[target.model_version] = embed_for(target, items)
            except Exception:
                if target in live_targets(connect):
                    raise
    return embedded


def write_items(connect: Connect, items: list[dict[str, Any]], embed_for: EmbedFor, policy: RetryPolicy) -> int:
    """Upserts `items` into every live collection; returns how many the blue collection took.

    Embeddings are made first, with no connection held (one set per model version); then one transaction
    writes them. If a collection for another model appeared meanwhile, its embeddings are made and the
    transaction is tried again (`policy`: the stack's `retries.write`).
    """
    embedded: dict[int, list[EmbeddedItem]] = {}

    def attempt() -> int:
        embed_for_live(connect, items, embed_for, embedded)
        with connect() as conn, conn.transaction():
            state = blue_green.get_state(conn, lock=True)
            targets = state.write_targets()
            if any(t.model_version not in embedded for t in targets):
                raise tenacity.TryAgain  # rolled back (it only read): embed for the new collection first
            ids = sorted({item["id"] for item in items})
            versions = dict(zip(ids, next_versions(conn, len(ids))))
            written = {t.collection: Collection(t.collection, t.dim).upsert(conn, embedded[t.model_version], versions)
                       for t in targets}
            return written[state.blue.collection]

    return _until_written("write", policy, attempt)


def delete_items(conn: psycopg.Connection, ids: list[str], policy: RetryPolicy) -> int:
    """Deletes from every live collection (tombstones); returns how many the blue collection held."""
    ids = sorted(set(ids))

    def attempt() -> int:
        with conn.transaction():
            state = blue_green.get_state(conn, lock=True)
            versions = dict(zip(ids, next_versions(conn, len(ids))))
            deleted = {t.collection: Collection(t.collection, t.dim).delete(conn, ids, versions)
                       for t in state.write_targets()}
            return deleted[state.blue.collection]

    return _until_written("delete", policy, attempt)


def _until_written(what: str, policy: RetryPolicy, attempt: Callable[[], int]) -> int:
    """Runs `attempt` under the write policy; a transaction Postgres rolled back (deadlock) is simply run
    again. LifecycleMoved when the last attempt still could not complete."""
    try:
        return retries.retrying(policy, f"dual_write.{what}")(attempt)
    except (tenacity.TryAgain, *retries.RETRY_ON[policy.retry_on]) as err:
        raise LifecycleMoved(f"the {what} could not complete in {policy.attempts} attempts "
                             "(lifecycle changes or deadlocks)") from err
