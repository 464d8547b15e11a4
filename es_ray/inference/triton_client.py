"""Embedding through Triton: tokenise here, send token ids over gRPC, receive normalised vectors.

The gRPC client is thread-safe, so one encoder serves every request thread of a replica. Queries go
through one tokenising function whose settings never change, which threads share
(tokenizer.rows_tokenizer); chunking calls transformers' tokenizer, which refuses concurrent calls, so
threads borrow one from a small pool (request threads come and go, so a per-thread tokenizer would be
loaded again for nearly every request).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from typing import Callable

import numpy as np
import tritonclient.grpc as triton_grpc

from es_ray.inference.chunking import Chunks, split
from es_ray.inference.tokenizer import load_tokenizer, rows_tokenizer
from es_ray.inference.triton_repo import ITEM_ENCODER, QUERY_ENCODER, ragged_batches, served_name


def channel_args() -> list[tuple[str, int]]:
    """tritonclient's defaults, with gRPC's reconnect back-off capped at 2 s (its default grows to 120 s):
    after a Triton restart the client reconnects within seconds; until then calls fail at once."""
    keepalive = triton_grpc.KeepAliveOptions()
    return [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000)]


def grpc_address(target, stack_url: str) -> str:
    """Where a lifecycle target's encoders are served: the stack's Triton where there is one (an external
    triton.url serves every version), else its version's own tritonserver (the embedded stack, recorded in
    `models` by the lifecycle driver once the version answered). Clients cache encoders by this address, so
    a version whose server moved (redeployed on other ports) gets a new client."""
    address = stack_url or getattr(target, "triton_grpc_url", None)
    if not address:
        raise TritonUnavailable(f"no Triton address recorded for model version {target.model_version} yet")
    return address


def query_padding(settings) -> int:
    """The multiple of tokens queries are padded to: 1 (their own length) where the query encoder's batches
    may be ragged (triton_repo.ragged_batches), else model.query_pad_multiple, so that equal shapes meet."""
    return 1 if ragged_batches(QUERY_ENCODER, settings.triton) else settings.model.query_pad_multiple


class TritonUnavailable(RuntimeError):
    """Triton did not answer or failed the request."""


class TritonEncoder:
    """Client for one served encoder (query or item) of one model version.

    `url` is Triton's gRPC address (host:port).
    """

    def __init__(self, url: str, model_name: str, model_version: int, tokenizer_dir: str,
                 max_length: int, max_batch_size: int = 64, timeout_s: float = 30.0, query_pad_multiple: int = 16,
                 in_flight: int = 1):
        # The Triton model of this encoder and version (es_ray/inference/triton_repo.py).
        self.url, self.model_name, self.model_version = url, served_name(model_name, model_version), str(model_version)
        self.max_length, self.max_batch_size, self.timeout_s = max_length, max_batch_size, timeout_s
        # Requests one embed_ids call keeps in flight at once (see embed_ids).
        self.in_flight = max(1, in_flight)
        self.tokenizer_dir = tokenizer_dir
        # Queries are padded to a multiple of this many tokens where Triton's dynamic batcher merges only
        # requests of one shape, so concurrent short queries can share a forward pass (1: batches may be
        # ragged, query_padding).
        self.query_pad_multiple = query_pad_multiple
        # Loaded at first use: a query encoder tokenises through query_rows and never borrows one.
        self._idle_tokenizers: queue.SimpleQueue = queue.SimpleQueue()
        self.client = triton_grpc.InferenceServerClient(url, channel_args=channel_args())

    @classmethod
    def of(cls, url: str, model_name: str, target, settings, max_batch_size: int | None = None,
           timeout_s: float | None = None) -> "TritonEncoder":
        """The encoder `model_name` (QUERY_ENCODER or ITEM_ENCODER) of a lifecycle target (anything with
        model_version, source_dir and max_length: blue, green), with the stack's Triton settings unless
        the caller asks for other batch sizes or deadlines. An item encoder keeps up to
        triton.item_instances requests in flight, one per model instance, so a lone bulk client (the last
        range of a reindex, a single upsert actor) keeps every instance busy; a query is one request."""
        return cls(grpc_address(target, url), model_name, target.model_version, target.source_dir, target.max_length,
                   max_batch_size or settings.triton.max_batch_size, timeout_s or settings.triton.timeout_s,
                   query_padding(settings),
                   settings.triton.item_instances if model_name == ITEM_ENCODER else 1)

    @contextmanager
    def tokenizer(self):
        """Borrows a tokenizer for the duration of a `with` block."""
        try:
            tokenizer = self._idle_tokenizers.get_nowait()
        except queue.Empty:
            tokenizer = load_tokenizer(self.tokenizer_dir)
        try:
            yield tokenizer
        finally:
            self._idle_tokenizers.put(tokenizer)

    def embed_ids(self, input_ids: np.ndarray, attention_mask: np.ndarray, trim: bool = True) -> np.ndarray:
        """Vectors for token-id rows, sent in requests of at most max_batch_size rows, up to `in_flight` of
        them at once (threads: the gRPC client is thread-safe and releases the GIL while it waits), so
        Triton has the next request queued when an instance finishes one, and several instances work
        for one caller.

        `trim` drops all-padding columns; queries keep their bucketed width instead (see
        query_pad_multiple).
        """
        starts = range(0, len(input_ids), self.max_batch_size)
        batches = [(input_ids[s:s + self.max_batch_size], attention_mask[s:s + self.max_batch_size], trim)
                   for s in starts]
        if self.in_flight > 1 and len(batches) > 1:
            with ThreadPoolExecutor(min(self.in_flight, len(batches)), thread_name_prefix="triton") as pool:
                out = list(pool.map(lambda batch: self._infer(*batch), batches))
        else:
            out = [self._infer(*batch) for batch in batches]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def _infer(self, ids: np.ndarray, mask: np.ndarray, trim: bool) -> np.ndarray:
        """One request to Triton: the vectors of these rows."""
        width = int(mask.sum(axis=1).max()) if trim and len(mask) else ids.shape[1]
        ids, mask = np.ascontiguousarray(ids[:, :width]), np.ascontiguousarray(mask[:, :width])
        inputs = [triton_grpc.InferInput("input_ids__0", list(ids.shape), "INT64"),
                  triton_grpc.InferInput("attention_mask__1", list(mask.shape), "INT64")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(mask)
        try:
            result = self.client.infer(self.model_name, inputs, model_version=self.model_version,
                                       outputs=[triton_grpc.InferRequestedOutput("embedding__0")],
                                       client_timeout=self.timeout_s)
        except Exception as err:  # noqa: BLE001 - network errors and server errors alike
            raise TritonUnavailable(f"Triton {self.model_name} v{self.model_version}: {err}") from err
        return result.as_numpy("embedding__0")

    @cached_property
    def query_rows(self):
        """texts -> token-id rows as queries are sent (tokenizer.rows_tokenizer; shared by every thread)."""
        return rows_tokenizer(self.tokenizer_dir, self.max_length, self.query_pad_multiple)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        """One vector per text, truncated to max_length tokens (queries are short)."""
        return self.embed_ids(*self.query_rows(texts), trim=False)

    def embed_chunks(self, texts: list[str], overlap: int, max_chunks: int) -> tuple[Chunks, np.ndarray]:
        """Splits long texts into chunks and embeds every chunk; returns the chunks and their vectors."""
        with self.tokenizer() as tokenizer:
            chunks = split(tokenizer, texts, self.max_length, overlap, max_chunks)
        order = np.argsort(-chunks.attention_mask.sum(axis=1), kind="stable")  # similar lengths share a batch
        vectors = np.empty((len(order), 0), dtype=np.float32)
        if len(order):
            sorted_vectors = self.embed_ids(chunks.input_ids[order], chunks.attention_mask[order])
            vectors = np.empty_like(sorted_vectors)
            vectors[order] = sorted_vectors
        return chunks, vectors

    def ready(self) -> bool:
        try:
            return bool(self.client.is_model_ready(self.model_name, self.model_version))
        except Exception:  # noqa: BLE001
            return False

    def close(self) -> None:
        self.client.close()


class RecentEncoders:
    """Encoders made once per model version, encoder name and address, kept for the `keep` versions used
    most recently (blue, green, previous). A long-lived process (a Serve replica, the lifecycle driver)
    meets every version ever deployed, and an encoder holds a gRPC channel and a tokenizer (about 13 MiB
    with the query tokenizer), so keeping every one grew the process with each deploy. A caller still
    holding a dropped encoder keeps it until its call returns; tritonclient closes the channel when the
    client is collected."""

    def __init__(self, keep: int = 3):
        self.keep = keep
        self._by_version: OrderedDict[int, dict[str, tuple[str, TritonEncoder]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version: int, address: str, make: Callable[[], TritonEncoder], name: str = "") -> TritonEncoder:
        """The encoder `name` of `version` served at `address`, made by `make()` at first use, and again where
        the version moved to another address (redeployed: the old one's server is gone)."""
        with self._lock:
            encoders = self._by_version.setdefault(version, {})
            self._by_version.move_to_end(version)
            kept = encoders.get(name)
            if kept is None or kept[0] != address:
                kept = encoders[name] = (address, make())
                while len(self._by_version) > self.keep:
                    self._by_version.popitem(last=False)
            return kept[1]

    def versions(self) -> list[int]:
        """Versions with encoders kept, least recently used first."""
        with self._lock:
            return list(self._by_version)
