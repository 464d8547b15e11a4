"""A typed Python client of the HTTP API (es_ray/serve/app.py), used by the demo, the benchmarks and the tests.

    with EsRayClient.for_stack(manifest) as client:            # the local API key of that stack
        found = client.search("protein folding", limit=5)      # -> schemas.SearchResponse
        client.click(found.session_id, found.results[0].id)

Requests are built from the API's own request models (es_ray/serve/schemas.py), so a misspelt option,
a wrong type or a filter the server would refuse fails here, with pydantic's ValidationError, before
anything is sent. The size limits those models check are the defaults of configs/stack.yaml; a server
configured with larger ones accepts more than this client sends. Answers are the response models where
a route has one, else plain dicts. A 4xx or 5xx answer raises EsRayError with the server's message;
connection failures stay httpx's own errors (httpx.TransportError).

Credentials: an API key (admin, X-API-Key) and/or a user's token (X-User-Token, issued by
`issue_user_token`). A key passes every user check, so `as_user(token)` returns a client that sends
only the token: what that user's own application would do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpx
from pydantic import BaseModel

from es_ray.serve import schemas
from es_ray.serve.auth import API_KEY_HEADER, USER_TOKEN_HEADER
from es_ray.stack.credentials import local_api_key
from es_ray.stack.manifest import StackManifest
from es_ray.store.tasks import KINDS as TASK_KINDS

FINISHED = ("done", "failed", "cancelled")  # task statuses that do not change any more


class EsRayError(Exception):
    """The server answered 4xx or 5xx: `status`, its one-line `detail`, the per-field `details` (422) and
    `retry_after`, the seconds its Retry-After header asks a client to wait (429 over a rate limit, 503),
    else None."""

    def __init__(self, status: int, detail: str, details: list[dict[str, Any]] | None = None,
                 response: httpx.Response | None = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.detail, self.details, self.response = status, detail, details or [], response
        self.retry_after = _retry_after(response)

    @classmethod
    def of(cls, response: httpx.Response) -> "EsRayError":
        try:
            body = response.json()
        except ValueError:  # not every failure is ours: a proxy or Serve itself may answer in plain text
            body = None
        if isinstance(body, dict) and "error" in body:
            return cls(response.status_code, str(body["error"]), body.get("details") or [], response)
        return cls(response.status_code, response.text[:500] or response.reason_phrase, [], response)


def _retry_after(response: httpx.Response | None) -> float | None:
    """Retry-After in seconds; es-ray sends whole seconds (the header's HTTP-date form is not read)."""
    text = response.headers.get("retry-after") if response is not None else None
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _body(request: BaseModel) -> dict[str, Any]:
    return request.model_dump(mode="json", exclude_none=True)  # unset options: the server's defaults


class EsRayClient:
    """One es-ray deployment. Thread-safe (one httpx.Client and its connection pool); close it, or use
    it as a context manager."""

    def __init__(self, url: str, api_key: str | None = None, user_token: str | None = None,
                 timeout: float = 60.0, local_address: str | None = None):
        """`local_address`: the source address of every connection (e.g. 127.0.0.7: Linux routes all of
        127/8 to loopback), so that simulated people are distinct clients to the server's rate limits
        and its learning (es_ray/serve/clients.py)."""
        self.url, self.api_key, self.user_token, self.timeout = url.rstrip("/"), api_key, user_token, timeout
        self.local_address = local_address
        headers = {}
        if api_key:
            headers[API_KEY_HEADER] = api_key
        if user_token:
            headers[USER_TOKEN_HEADER] = user_token
        # The raw client, with these credentials, for callers that need the raw exchange.
        transport = httpx.HTTPTransport(local_address=local_address) if local_address else None
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    @classmethod
    def for_stack(cls, manifest: StackManifest, timeout: float = 60.0, anonymous: bool = False,
                  local_address: str | None = None) -> "EsRayClient":
        """A client of a stack started here, with the API key `es-ray up` made in its state dir
        (es_ray/stack/credentials.py); `anonymous=True` leaves the key out (what anyone may do)."""
        key = None if anonymous else local_api_key(manifest.state_dir)
        return cls(manifest.serve_url, api_key=key, timeout=timeout, local_address=local_address)

    def as_user(self, token: str | schemas.UserToken) -> "EsRayClient":
        """A new client acting as one user: that user's token and no API key."""
        token = token.token if isinstance(token, schemas.UserToken) else token
        return EsRayClient(self.url, user_token=token, timeout=self.timeout, local_address=self.local_address)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "EsRayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport ----------------------------------------------------------------------------------

    def send(self, method: str, path: str, request: BaseModel | None = None,
             params: dict[str, Any] | None = None, timeout: float | None = None) -> httpx.Response:
        """One request, answered raw (no status check): for callers that time requests or count statuses."""
        extra = {} if timeout is None else {"timeout": timeout}
        return self.http.request(method, path, json=None if request is None else _body(request),
                                 params={k: v for k, v in (params or {}).items() if v is not None}, **extra)

    def _call(self, method: str, path: str, request: BaseModel | None = None,
              params: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
        response = self.send(method, path, request, params, timeout)
        if response.status_code >= 400:
            raise EsRayError.of(response)
        return response.json()

    # --- search and items ---------------------------------------------------------------------------

    def search(self, query: str, *, limit: int = 10, offset: int = 0, filter: dict[str, Any] | None = None,
               user_id: str | None = None, session: bool = True, mode: str | None = None) -> schemas.SearchResponse:
        """Best results first; with `session` the shown list is recorded (send clicks to its session_id).
        `mode`: dense, lexical or hybrid (None: the stack's search.default_mode)."""
        request = self.search_request(query, limit=limit, offset=offset, filter=filter, user_id=user_id,
                                      session=session, mode=mode)
        return schemas.SearchResponse.model_validate(self._call("POST", "/v1/search", request))

    @staticmethod
    def search_request(query: str, **options: Any) -> schemas.SearchRequest:
        """The validated body of a search, for `send("POST", "/v1/search", ...)` where the raw answer matters."""
        return schemas.SearchRequest(query=query, **options)

    def upsert_items(self, items: Iterable[schemas.Item | dict[str, Any]],
                     timeout: float | None = None) -> schemas.UpsertResponse:
        """Inserts or replaces items ({"id", "text", "payload"}); failures per item are in the answer."""
        request = schemas.UpsertRequest(items=list(items))
        return schemas.UpsertResponse.model_validate(self._call("PUT", "/v1/items", request, timeout=timeout))

    def delete_items(self, ids: Iterable[str]) -> schemas.DeleteResponse:
        request = schemas.DeleteRequest(ids=list(ids))
        return schemas.DeleteResponse.model_validate(self._call("DELETE", "/v1/items", request))

    # --- clickstream --------------------------------------------------------------------------------

    def create_session(self, query: str, shown: Sequence[str], *, first_rank: int = 1,
                       session_id: str | None = None, user_id: str | None = None) -> schemas.SessionCreated:
        """Records a result list shown by another system: `shown` item ids in order, the first at `first_rank`.
        Needs the API key (recorded with the session as its source); its clicks need the key too, or the
        token of `user_id`. Sessions of `search` need neither: their ids are signed by the server."""
        request = schemas.SessionRequest(
            query=query, session_id=session_id, user_id=user_id,
            results=[schemas.ShownResult(id=item, rank=first_rank + k) for k, item in enumerate(shown)])
        return schemas.SessionCreated.model_validate(self._call("POST", "/v1/sessions", request))

    def session(self, session_id: str) -> schemas.SessionOut:
        return schemas.SessionOut.model_validate(self._call("GET", f"/v1/sessions/{session_id}"))

    def add_events(self, session_id: str, events: Iterable[schemas.Event | dict[str, Any]]) -> schemas.EventsResponse:
        """Click events ({"event_id", "item_id", "type": "click"}); an event_id resent to the same session
        counts as a duplicate."""
        request = schemas.EventsRequest(events=list(events))
        return schemas.EventsResponse.model_validate(self._call("POST", f"/v1/sessions/{session_id}/events", request))

    def click(self, session_id: str, *item_ids: str) -> schemas.EventsResponse:
        """One click on each item, with new event ids."""
        return self.add_events(session_id, [schemas.Event(event_id=uuid.uuid4().hex, item_id=item, type="click")
                                            for item in item_ids])

    def mark_irrelevant(self, session_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/sessions/{session_id}/irrelevant")

    # --- improvement and users ----------------------------------------------------------------------

    def run_improvement(self, settle_s: float | None = None, timeout: float = 3600) -> dict[str, Any]:
        """One improvement pass over the settled sessions (all of them with settle_s=0); its counts."""
        return self._call("POST", "/v1/improvement/run", params={"settle_s": settle_s}, timeout=timeout)

    def undo_improvement(self) -> dict[str, Any]:
        return self._call("POST", "/v1/improvement/undo")

    def forget_user(self, user_id: str) -> dict[str, Any]:
        """Deletes everything learned from one user's clicks (that user's token or an API key)."""
        return self._call("DELETE", f"/v1/users/{user_id}/personalisation")

    def issue_user_token(self, user_id: str, ttl_s: float | None = None) -> schemas.UserToken:
        request = schemas.TokenRequest(ttl_s=ttl_s)
        return schemas.UserToken.model_validate(self._call("POST", f"/v1/users/{user_id}/token", request))

    # --- tasks --------------------------------------------------------------------------------------

    def start_fine_tune(self, config: dict[str, Any] | None = None) -> schemas.TaskOut:
        """A fine-tune task from the clickstream; `config` overrides configs/finetune.yaml."""
        request = schemas.FineTuneRequest(config=config or {})
        return schemas.TaskOut.model_validate(self._call("POST", "/v1/tasks/fine-tune", request, timeout=120))

    def start_reindex(self, to: int, *, switch: str | None = None, hnsw: str | None = None) -> schemas.TaskOut:
        """Re-embeds every item with model version `to` into a green collection."""
        request = schemas.ReindexRequest(to=to, switch=switch, hnsw=hnsw)
        return schemas.TaskOut.model_validate(self._call("POST", "/v1/tasks/reindex", request, timeout=120))

    def task(self, task_id: str) -> schemas.TaskOut:
        return schemas.TaskOut.model_validate(self._call("GET", f"/v1/tasks/{task_id}"))

    def tasks(self, kind: str | None = None, limit: int = 20) -> list[schemas.TaskOut]:
        """Recent tasks, newest first; `kind` one of es_ray.store.tasks.KINDS."""
        if kind is not None and kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {kind!r}: one of {', '.join(TASK_KINDS)}")
        answer = self._call("GET", "/v1/tasks", params={"kind": kind, "limit": limit})
        return schemas.TaskList.model_validate(answer).tasks

    def wait_for_task(self, task_id: str, timeout_s: float = 7200, poll_s: float = 3,
                      on_update: Callable[[schemas.TaskOut], None] | None = None) -> schemas.TaskOut:
        """Polls a task until it is done, failed or cancelled (returned as it ended); TimeoutError after
        timeout_s. `on_update` sees every poll's answer (progress bars, logs)."""
        deadline = time.monotonic() + timeout_s
        while True:
            task = self.task(task_id)
            if on_update is not None:
                on_update(task)
            if task.status in FINISHED:
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} still {task.status} after {timeout_s}s")
            time.sleep(poll_s)

    # --- lifecycle and health -----------------------------------------------------------------------

    def lifecycle(self) -> dict[str, Any]:
        """Blue, green and previous collections, locks, tasks, switches, models."""
        return self._call("GET", "/v1/lifecycle")

    def switch(self, force: bool = False, idempotency_key: str | None = None) -> dict[str, Any]:
        """`idempotency_key`: sending the same key again returns the first call's switch (safe to retry)."""
        return self._keyed("/v1/lifecycle/switch", schemas.SwitchRequest(force=force), idempotency_key)

    def rollback(self, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._keyed("/v1/lifecycle/rollback", None, idempotency_key)

    def abandon_green(self, collection: str | None = None) -> dict[str, Any]:
        """Gives up the green collection (a failed reindex): dual writes off, collection dropped."""
        return self._call("POST", "/v1/lifecycle/abandon-green", schemas.AbandonRequest(collection=collection),
                          timeout=300)

    def _keyed(self, path: str, request: BaseModel | None, idempotency_key: str | None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = self.http.post(path, json=None if request is None else _body(request), headers=headers,
                                  timeout=300)
        if response.status_code >= 400:
            raise EsRayError.of(response)
        return response.json()

    def cleanup(self, now: bool = False) -> dict[str, Any]:
        return self._call("POST", "/v1/lifecycle/cleanup", schemas.CleanupRequest(now=now), timeout=300)

    def health(self) -> dict[str, Any]:
        """The health report; {"healthy": false, ...} (a 503) is an answer here, not an error."""
        response = self.send("GET", "/healthz")
        if response.status_code not in (200, 503):
            raise EsRayError.of(response)
        return response.json()
