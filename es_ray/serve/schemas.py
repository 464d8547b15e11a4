"""Request and response bodies of the HTTP API. Limits come from configs/stack.yaml (serve:)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from es_ray.config import ServeSettings
from es_ray.store.filters import compile_filter

LIMITS = ServeSettings()  # replaced by configure_limits() at app build time


def configure_limits(settings: ServeSettings) -> None:
    global LIMITS
    LIMITS = settings


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorOut(BaseModel):
    """Every error the API answers (4xx and 503) has this body."""

    error: str = Field(description="What is wrong, in one line.")
    details: list[ErrorDetail] = Field(default_factory=list, description="One entry per invalid field (422).")


ERROR_RESPONSES = {status: {"model": ErrorOut, "description": description} for status, description in {
    400: "The body could not be read", 401: "No valid API key or user token", 403: "Another user's data, or a session this es-ray did not serve",
    404: "Unknown id or path", 409: "Conflicts with stored data or running work", 413: "Request body too large",
    422: "Invalid request: details name each field", 429: "Over a rate limit (no API key): retry after Retry-After",
    503: "A dependency is unavailable: retry after Retry-After",
}.items()}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _check_chars(value: str, what: str) -> str:
    """Text Postgres can store: no NUL character, no lone UTF-16 surrogate (JSON allows both)."""
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid unicode (a lone surrogate at character {err.start})") from None
    return value


def check_id(value: str) -> str:
    if not value:
        raise ValueError("id must not be empty")
    if len(value) > LIMITS.max_id_length:
        raise ValueError(f"id is {len(value)} characters long; the limit is {LIMITS.max_id_length}")
    return _check_chars(value, "id")


_check_id = check_id


def check_json(value: Any, what: str, depth: int = 0) -> Any:
    """Payloads and filters: strings and keys as in _check_chars, finite numbers, bounded nesting."""
    if depth > LIMITS.max_payload_depth:
        raise ValueError(f"{what} is nested deeper than {LIMITS.max_payload_depth} levels")
    if isinstance(value, str):
        _check_chars(value, what)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} holds {value}: numbers must be finite")
    elif isinstance(value, dict):
        for key, inner in value.items():
            _check_chars(key, f"{what} key")
            check_json(inner, what, depth + 1)
    elif isinstance(value, list):
        for inner in value:
            check_json(inner, what, depth + 1)
    return value


def _at_most_per_request(values: list, what: str, hint: str = "") -> list:
    if len(values) > LIMITS.max_items_per_request:
        raise ValueError(f"{len(values)} {what} in one request; the limit is {LIMITS.max_items_per_request}{hint}")
    return values


class Item(Strict):
    id: str = Field(description="Your identifier for the item; re-upserting an id replaces the item.")
    text: str = Field(description="The text to embed; long texts are split into chunks.")
    payload: dict[str, Any] = Field(default_factory=dict, description="Any JSON object, returned with results "
                                    "and usable in filters.")

    _id = field_validator("id")(_check_id)

    @field_validator("text")
    @classmethod
    def _check_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text must not be empty")
        if len(value) > LIMITS.max_text_chars:
            raise ValueError(f"text is {len(value)} characters long; the limit is {LIMITS.max_text_chars}")
        return _check_chars(value, "text")

    _payload = field_validator("payload")(lambda value: check_json(value, "payload"))


class UpsertRequest(Strict):
    items: list[Item] = Field(min_length=1)

    @field_validator("items")
    @classmethod
    def _check_count(cls, items: list[Item]) -> list[Item]:
        return _at_most_per_request(items, "items", " (use the bulk upsert job for more)")


class ItemFailure(BaseModel):
    id: str
    error: str


class UpsertResponse(BaseModel):
    upserted: int
    failed: list[ItemFailure] = []


class DeleteRequest(Strict):
    ids: list[str] = Field(min_length=1)

    @field_validator("ids")
    @classmethod
    def _check_ids(cls, ids: list[str]) -> list[str]:
        return [_check_id(i) for i in _at_most_per_request(ids, "ids")]


class DeleteResponse(BaseModel):
    deleted: int


SearchMode = Literal["dense", "lexical", "hybrid"]


class SearchRequest(Strict):
    query: str = Field(description="Free text.")
    mode: SearchMode | None = Field(None, description="dense (the model's vectors), lexical (full-text search "
                                    "over the items' text) or hybrid (both lists fused); default "
                                    "search.default_mode.")
    limit: int = Field(10, description="Results per page, 1 to serve.max_limit (default 100).")
    offset: int = Field(0, description="Results to skip, 0 to serve.max_offset.")
    filter: dict[str, Any] | None = Field(None, description="Payload filter, see es_ray.store.filters: "
                                          '{"field": value}, {"field": {"in"|"gt"|"gte"|"lt"|"lte"|"ne"|"exists": '
                                          '...}}, {"and"|"or": [...]}, {"not": {...}}. Bounded in depth, '
                                          'comparisons, `in` values and fields (serve.filter_limits).')
    user_id: str | None = Field(None, description="Who searches: recorded with the session.")
    session: bool = Field(True, description="Record the shown results as a clickstream session.")

    _user = field_validator("user_id")(lambda value: value if value is None else _check_id(value))

    @field_validator("query")
    @classmethod
    def _check_query(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query must not be empty")
        if len(value) > LIMITS.max_query_chars:
            raise ValueError(f"query is {len(value)} characters long; the limit is {LIMITS.max_query_chars}")
        return _check_chars(value, "query")

    @field_validator("filter")
    @classmethod
    def _check_filter(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        check_json(value, "filter")
        # Raises FilterError (a ValueError: 422) naming the bad part, or the limit it goes over.
        compile_filter(value, limits=LIMITS.filter_limits)
        return value

    @field_validator("limit")
    @classmethod
    def _check_limit(cls, value: int) -> int:
        if not 1 <= value <= LIMITS.max_limit:
            raise ValueError(f"limit must be between 1 and {LIMITS.max_limit}")
        return value

    @field_validator("offset")
    @classmethod
    def _check_offset(cls, value: int) -> int:
        if not 0 <= value <= LIMITS.max_offset:
            raise ValueError(f"offset must be between 0 and {LIMITS.max_offset}")
        return value


class SearchResult(BaseModel):
    id: str
    score: float
    payload: dict[str, Any]


class SearchResponse(BaseModel):
    model: str = Field(description="The model version that embedded the query, e.g. 'v1'.")
    results: list[SearchResult]
    session_id: str | None = Field(None, description="Send click events for these results to this session.")
    fusion: str | None = Field(None, description=(
        "Hybrid mode only: the fusion that ranked this page, e.g. 'rrf k=60 dense=1 lexical=0.5' (a fusion learned "
        "from clicks may replace the configured one, and a small share of recorded anonymous searches is ranked by "
        "a fusion explored for that client and query, the same for all its pages). Pages of one query follow one ranking, without duplicates "
        "or gaps, while `model` and `fusion` stay the same; a change of either starts another ranking."))


# --- clickstream ---------------------------------------------------------------------------------

class ShownResult(Strict):
    id: str
    rank: int = Field(ge=1, le=100_000, description="1 for the top result")

    _id = field_validator("id")(_check_id)


class SessionRequest(Strict):
    session_id: str | None = Field(None, description="Your id for the session; generated when missing.")
    user_id: str | None = None
    query: str
    results: list[ShownResult] = Field(min_length=1, description="What was shown: at most "
                                       "serve.max_results_per_session results (default 100).")

    _ids = field_validator("session_id", "user_id")(lambda value: value if value is None else _check_id(value))
    _query = field_validator("query")(lambda value: SearchRequest._check_query(value))

    @field_validator("results")
    @classmethod
    def _check_results(cls, results: list[ShownResult]) -> list[ShownResult]:
        # One session is one result list: the improvement loop and the fine-tune read all of it at once.
        if len(results) > LIMITS.max_results_per_session:
            raise ValueError(f"{len(results)} results in one session; the limit is {LIMITS.max_results_per_session} "
                             "(serve.max_results_per_session)")
        _at_most_per_request(results, "results")
        if len({r.rank for r in results}) != len(results):
            raise ValueError("two results share a rank")
        if len({r.id for r in results}) != len(results):
            raise ValueError("an item is shown twice")
        return results


class SessionCreated(BaseModel):
    session_id: str
    created: bool = Field(description="False when the same session had been recorded before (idempotent).")


class Event(Strict):
    event_id: str = Field(description="Unique per event within its session: a resent event is counted as a "
                                      "duplicate; another session may use the same id.")
    item_id: str
    type: Literal["click"]

    _ids = field_validator("event_id", "item_id")(_check_id)


class EventsRequest(Strict):
    events: list[Event] = Field(min_length=1)

    @field_validator("events")
    @classmethod
    def _check_count(cls, events: list[Event]) -> list[Event]:
        return _at_most_per_request(events, "events")


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int


class EventOut(BaseModel):
    event_id: str
    item_id: str
    type: str
    created_at: datetime


class ShownResultOut(BaseModel):
    id: str
    rank: int
    dense_rank: int | None = Field(None, description="Its rank in the dense list (None: not in it, or not computed).")
    lexical_rank: int | None = Field(None, description="Its rank in the lexical list (None: not in it, or not "
                                                       "computed).")


class SessionOut(BaseModel):
    session_id: str
    user_id: str | None
    query: str
    model_version: int | None
    irrelevant: bool
    created_at: datetime
    mode: SearchMode | None = Field(None, description="The search mode that ranked the results (None: recorded "
                                                      "through POST /v1/sessions, or before modes existed).")
    results: list[ShownResultOut]
    events: list[EventOut]
    swapped_rank: int | None = Field(None, description="Search showed this rank and the next one exchanged "
                                                       "(a randomised swap that lets es-ray learn position bias).")
    source: str = Field(description="Who recorded it: served (es-ray's search), ingested (POST /v1/sessions "
                                    "with an API key) or unverified (POST /v1/sessions before sources were "
                                    "recorded); learning.exclude_sources leaves sources out of learning.")
    key_name: str | None = Field(None, description="The name of the API key that recorded it, if one did.")
    client: str | None = Field(None, description="The client that recorded it: its address (behind a trusted "
                                                 "proxy, the forwarded one).")


# --- tasks ---------------------------------------------------------------------------------------

class FineTuneRequest(Strict):
    config: dict[str, Any] = Field(default_factory=dict, description="Overrides of configs/finetune.yaml, e.g. "
                                   '{"tune": {"num_samples": 4}, "debias": {"enabled": false}}; unknown keys are refused.')

    @field_validator("config")
    @classmethod
    def _check_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        from es_ray.train.config import load_finetune_config

        try:
            load_finetune_config(overrides=value)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
            raise ValueError(f"invalid fine-tune config: {problems}") from None
        return value


class ReindexRequest(Strict):
    to: int = Field(ge=1, description="The registered model version to re-embed every item with.")
    switch: Literal["auto", "force", "never"] | None = Field(
        None, description="When green is complete: auto (switch if the quality gate passed), force, never. "
                          "Default: reindex.switch in configs/stack.yaml.")
    hnsw: Literal["after", "during"] | None = Field(
        None, description="Build the green HNSW index after the load or maintain it during it. "
                          "Default: reindex.hnsw.")


class SwitchRequest(Strict):
    force: bool = Field(False, description="Switch even if the green model has not passed the quality gate.")


class CleanupRequest(Strict):
    now: bool = Field(False, description="Drop the previous collection without waiting for its grace period.")


class AbandonRequest(Strict):
    collection: str | None = Field(None, max_length=64, pattern=r"^[a-z][a-z0-9_]*$",
                                   description="Abandon green only if it is this collection (default: whichever it is).")


class TokenRequest(Strict):
    ttl_s: float | None = Field(None, gt=0, le=30 * 86_400, description="Seconds the token is valid "
                                "(default auth.user_token_ttl_s).")


class UserToken(BaseModel):
    user_id: str
    token: str = Field(description="Send as the X-User-Token header.")
    expires_at: int = Field(description="Unix time.")


class TaskOut(BaseModel):
    task_id: str
    kind: str
    status: str = Field(description="pending | running | done | failed | cancelled")
    params: dict[str, Any]
    progress: dict[str, Any] = Field(description="Stage, trials done / running / total, best so far.")
    result: dict[str, Any] | None = None
    error: str | None = Field(None, description="Why a failed task failed.")
    job_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    heartbeat_at: datetime | None = None


class TaskList(BaseModel):
    tasks: list[TaskOut]
