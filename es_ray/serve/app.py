"""The HTTP API: one FastAPI ingress deployment on Ray Serve.

A request reads top to bottom here: validate (schemas.py) -> embed through Triton
(inference/triton_client.py) -> query or write the blue collection (store/collections.py).
Replicas find the stack through the lifecycle driver and follow the blue pointer in Postgres.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from importlib import resources
from typing import Any

import ray
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from es_ray import metrics
from es_ray.config import Settings
from es_ray.data import pipeline
from es_ray.improve import loop as improve_loop
from es_ray.inference.triton_client import TritonEncoder, TritonUnavailable
from es_ray.inference.triton_repo import ENCODERS, QUERY_ENCODER
from es_ray.lifecycle import dual_write
from es_ray.lifecycle.handle import UnknownModel, get_driver
from es_ray.lifecycle.switching import SwitchRefused
from es_ray.logs import get_logger
from es_ray.periodic import Periodic
from es_ray.serve import auth, exploration, schemas
from es_ray.serve.auth import Caller
from es_ray.serve.limits import BodySizeLimit
from es_ray.stack.manifest import StackManifest
from es_ray.store import clickstream, db, lifecycle, tasks
from es_ray.store.collections import Collection
from es_ray.store.lifecycle import Blue

log = get_logger(__name__)

app = FastAPI(
    title="es-ray",
    description="Self-improving semantic search: search, clickstream, items, personalisation, fine-tune and "
                "reindex tasks, blue/green lifecycle and health. Errors are JSON objects "
                "{\"error\": message, \"details\": [...]}. Admin and write routes need an API key "
                "(X-API-Key); a user's sessions and personalisation need that user's token (X-User-Token) or a key.",
    version="0.1.0",
    responses=schemas.ERROR_RESPONSES,
)
app.add_middleware(BodySizeLimit)

ADMIN = [Depends(auth.admin)]  # dependencies of every admin or write route


def _field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location if part != "body") or "body"


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """401, 403, 404 for unknown paths, 405: the same {"error", "details"} body as every other error."""
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail), "details": []},
                        headers=getattr(exc, "headers", None))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    details = []
    for error in exc.errors():
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        field = _field_path(tuple(error.get("loc", ())))
        if error.get("type") == "json_invalid":
            position = error.get("loc", ("body", "?"))[-1]
            field, message = "body", (f"request body is not valid JSON at character {position} "
                                      f"({error.get('ctx', {}).get('error', 'parse error')})")
        details.append({"field": field, "message": message})
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details[:5])
    return JSONResponse(status_code=422, content={"error": summary, "details": details})


def _path_id(value: str, field: str) -> str:
    """Path parameters get the same checks as ids in bodies (length, NUL, valid unicode): 422, not 500."""
    try:
        return schemas.check_id(value)
    except ValueError as err:
        raise RequestValidationError([{"loc": ("path", field), "msg": str(err), "type": "value_error"}]) from None


class BlueWatcher:
    """Keeps the replica's view of the blue pointer fresh by polling Postgres in the background.

    A request takes one snapshot at its start and uses it to the end, so a switch never mixes two
    models or collections inside one response.
    """

    def __init__(self, pool, refresh_s: float):
        self.pool, self.refresh_s = pool, refresh_s
        self.current: Blue | None = self._read()
        self._refresh = Periodic(self._poll, refresh_s, "blue-watcher")

    def _read(self) -> Blue | None:
        with self.pool.connection() as conn:
            return lifecycle.get_blue(conn)

    def _poll(self) -> None:
        try:
            self.current = self._read()
        except Exception as err:  # noqa: BLE001 - keep the last known pointer while Postgres is away
            log.warning("blue.refresh_failed", error=str(err))

    def stop(self) -> None:
        self._refresh.stop()


class ServiceUnavailable(Exception):
    pass


@app.exception_handler(ServiceUnavailable)
async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": "1"})


# Domain errors -> HTTP status, each answered as {"error": message, "details": []}.
CLIENT_ERRORS = {clickstream.UnknownSession: 404, clickstream.EventRejected: 422, clickstream.Conflict: 409,
                 tasks.UnknownTask: 404, tasks.TaskConflict: 409, SwitchRefused: 409, UnknownModel: 404}


def _driver_call(ref):
    """The driver's answer; a domain error raised in the actor is re-raised as itself (not Ray's wrapper)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, tuple(CLIENT_ERRORS)):
            raise cause from None
        raise


def _client_error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": str(exc), "details": []})
    return handler


for _error, _status in CLIENT_ERRORS.items():
    app.add_exception_handler(_error, _client_error(_status))


@app.exception_handler(db.OperationalError)
async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": f"database unavailable: {exc}"}, headers={"Retry-After": "1"})


@serve.deployment(name="SearchAPI", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class SearchAPI:
    def __init__(self, namespace: str = "es-ray", settings_version: str = ""):
        # settings_version is unused here: a new value (new keys, limits) makes `serve.run` roll the replicas.
        stack = ray.get(get_driver(namespace).stack.remote())
        self.settings = Settings.model_validate(stack["settings"])
        self.manifest = StackManifest.model_validate(stack["manifest"])
        schemas.configure_limits(self.settings.serve)
        auth.configure(self.settings.auth)
        self.driver = get_driver(namespace)
        self.pool = db.open_pool(self.manifest.postgres_dsn, self.settings.postgres.pool_size,
                                 self.settings.postgres.hnsw_ef_search, self.settings.postgres.pool_timeout_s)
        self.blue = BlueWatcher(self.pool, self.settings.serve.blue_refresh_s)
        self._encoders: dict[tuple[str, int], TritonEncoder] = {}
        self._lock = threading.Lock()
        self._random = random.Random()
        self.item_encoders = pipeline.Encoders(self.settings, self.manifest.triton_grpc_url)

    def _encoder(self, name: str, blue: Blue) -> TritonEncoder:
        key = (name, blue.model_version)
        with self._lock:
            if key not in self._encoders:
                self._encoders[key] = TritonEncoder.of(self.manifest.triton_grpc_url, name, blue, self.settings)
            return self._encoders[key]

    def _blue(self) -> Blue:
        blue = self.blue.current
        if blue is None:
            raise ServiceUnavailable("no blue model yet: the stack is still bootstrapping")
        return blue

    @app.get("/healthz", summary="200 once Postgres, Triton, MLflow and the lifecycle driver answer",
             responses={503: {"description": "Not healthy: the body says which part is not"}})
    def healthz(self) -> JSONResponse:
        report: dict[str, Any] = {}
        try:
            report.update(ray.get(self.driver.health.remote(), timeout=10))
            report["lifecycle_driver"] = "ok"
        except Exception as err:  # noqa: BLE001
            report["lifecycle_driver"] = f"error: {err}"
        blue = self.blue.current
        if blue is None:
            report["triton"] = "error: no blue model"
        else:
            ready = all(self._encoder(name, blue).ready() for name in ENCODERS)
            report["triton"] = "ok" if ready else f"error: model v{blue.model_version} not ready"
            report["blue"] = {"model_version": blue.model_version, "collection": blue.collection}
        healthy = all(v == "ok" for k, v in report.items() if k != "blue")
        return JSONResponse(status_code=200 if healthy else 503, content={"healthy": healthy, **report})

    @app.post("/v1/search", response_model=schemas.SearchResponse, summary="Semantic search over the blue collection",
              description="Results come best first, except that a first page recorded as an anonymous session has "
                          "one adjacent pair among its top results exchanged in a small share of searches "
                          "(serve.swap_share): these randomised swaps let es-ray learn how much attention each "
                          "rank gets. The session records the order shown. Searches with session=false or a "
                          "user_id are never swapped.")
    def search(self, request: schemas.SearchRequest, who: Caller = Depends(auth.searcher)) -> schemas.SearchResponse:
        if request.user_id is not None:
            auth.require_user(who, request.user_id, f"personalised search for user {request.user_id!r}")
        blue = self._blue()
        started, status = time.monotonic(), "unavailable"
        try:
            vector = self._encoder(QUERY_ENCODER, blue).embed_queries([request.query])[0]
            with self.pool.connection() as conn:
                hits = Collection(blue.collection, blue.dim).search(conn, vector, request.limit, request.offset,
                                                                    request.filter, request.user_id)
            status = "ok"
        except TritonUnavailable as err:
            raise ServiceUnavailable(f"embedding service unavailable: {err}") from err
        except db.OperationalError as err:
            raise ServiceUnavailable(f"database unavailable: {err}") from err
        finally:
            metrics.count("es_ray_search_requests", model=blue.model_version, status=status)
            metrics.observe("es_ray_search_latency_ms", (time.monotonic() - started) * 1000, model=blue.model_version)
        session_id = None
        if request.session and hits:
            swap = None
            if request.user_id is None and request.offset == 0:  # a user's own ranking is never explored
                swap = exploration.choose_swap(len(hits), self.settings.serve.swap_share,
                                               self.settings.serve.swap_max_rank, self._random)
                hits = exploration.swapped(hits, swap)
            session_id = uuid.uuid4().hex
            with self.pool.connection() as conn:
                clickstream.record_session(conn, session_id, request.user_id, request.query, blue.model_version,
                                           [(request.offset + rank, h.id) for rank, h in enumerate(hits, start=1)],
                                           swap)
            metrics.count("es_ray_sessions", source="search")
        return schemas.SearchResponse(model=f"v{blue.model_version}", session_id=session_id,
                                      results=[schemas.SearchResult(id=h.id, score=h.score, payload=h.payload)
                                               for h in hits])

    @app.put("/v1/items", response_model=schemas.UpsertResponse, dependencies=ADMIN,
             summary="Insert or replace items (long texts are chunked; each chunk and the average get a vector)")
    def upsert(self, request: schemas.UpsertRequest) -> schemas.UpsertResponse:
        self._blue()  # 503 while the stack bootstraps
        items = [item.model_dump() for item in request.items]
        started = time.monotonic()
        if len(items) > self.settings.serve.large_upsert_items:
            written, failed = self._upsert_with_ray_data(items)
        else:
            written, failed = pipeline.upsert_now(self.item_encoders, self.pool, self.settings, items)
        if failed and not written:
            raise ServiceUnavailable(f"no item could be stored: {failed[0]['error']}")
        metrics.count("es_ray_upsert_items", written, path="http")
        metrics.count("es_ray_upsert_failures", len(failed), path="http")
        log.info("items.upserted", items=written, failed=len(failed), seconds=round(time.monotonic() - started, 3))
        return schemas.UpsertResponse(upserted=written, failed=[schemas.ItemFailure(**f) for f in failed])

    def _upsert_with_ray_data(self, items: list[dict[str, Any]]) -> tuple[int, list[dict[str, str]]]:
        import json

        import ray.data

        rows = [{"id": i["id"], "text": i["text"], "payload_json": json.dumps(i["payload"])} for i in items]
        written, failed = 0, []
        for batch in pipeline.upsert_dataset(ray.data.from_items(rows), self.settings, self.manifest.triton_grpc_url,
                                             self.manifest.postgres_dsn):
            for item_id, error in zip(batch["id"], batch["error"]):
                if error:
                    failed.append({"id": str(item_id), "error": str(error)})
                else:
                    written += 1
        return written, failed

    @app.delete("/v1/items", response_model=schemas.DeleteResponse, dependencies=ADMIN, summary="Delete items by id")
    def delete(self, request: schemas.DeleteRequest) -> schemas.DeleteResponse:
        self._blue()  # 503 while the stack bootstraps
        try:
            with self.pool.connection() as conn:
                deleted = dual_write.delete_items(conn, request.ids)
        except db.OperationalError as err:
            raise ServiceUnavailable(f"database unavailable: {err}") from err
        metrics.count("es_ray_deleted_items", deleted)
        return schemas.DeleteResponse(deleted=deleted)


    # --- clickstream ------------------------------------------------------------------------------

    @app.post("/v1/sessions", response_model=schemas.SessionCreated,
              summary="Record a result list shown elsewhere (for clients that search another way)")
    def create_session(self, request: schemas.SessionRequest,
                       who: Caller = Depends(auth.clickstream_writer)) -> schemas.SessionCreated:
        if request.user_id is not None:
            auth.require_user(who, request.user_id, f"a session of user {request.user_id!r}")
        session_id = request.session_id or uuid.uuid4().hex
        with self.pool.connection() as conn:
            created = clickstream.record_session(conn, session_id, request.user_id, request.query, None,
                                                 [(r.rank, r.id) for r in request.results])
        if created:
            metrics.count("es_ray_sessions", source="external")
        return schemas.SessionCreated(session_id=session_id, created=created)

    @app.get("/v1/sessions/{session_id}", response_model=schemas.SessionOut,
             summary="A session with its events (its user's token or an API key)")
    def read_session(self, session_id: str, who: Caller = Depends(auth.someone)) -> schemas.SessionOut:
        _path_id(session_id, "session_id")
        with self.pool.connection() as conn:
            auth.require_user(who, clickstream.session_owner(conn, session_id), f"session {session_id}")
            session = clickstream.get_session(conn, session_id)
        return schemas.SessionOut(**{**session.__dict__,
                                     "results": [{"id": i, "rank": r} for r, i in session.results]})

    @app.post("/v1/sessions/{session_id}/events", response_model=schemas.EventsResponse,
              summary="Record clicks on shown results; idempotent by event_id, all or nothing")
    def add_events(self, session_id: str, request: schemas.EventsRequest,
                   who: Caller = Depends(auth.clickstream_writer)) -> schemas.EventsResponse:
        with self.pool.connection() as conn:
            self._check_owner(conn, who, session_id)
            accepted, duplicates = clickstream.add_events(
                conn, session_id, [(e.event_id, e.item_id, e.type) for e in request.events])
        metrics.count("es_ray_click_events", accepted, result="accepted")
        metrics.count("es_ray_click_events", duplicates, result="duplicate")
        return schemas.EventsResponse(accepted=accepted, duplicates=duplicates)

    @app.post("/v1/sessions/{session_id}/irrelevant", summary="Mark the whole result list as irrelevant")
    def mark_irrelevant(self, session_id: str, who: Caller = Depends(auth.clickstream_writer)) -> dict[str, Any]:
        with self.pool.connection() as conn:
            self._check_owner(conn, who, session_id)
            clickstream.mark_irrelevant(conn, session_id)
        metrics.count("es_ray_irrelevant_marks")
        return {"session_id": session_id, "irrelevant": True}

    @staticmethod
    def _check_owner(conn, who: Caller, session_id: str) -> None:
        """A user's session takes events only from that user (or an admin); anonymous ones from anyone
        who knows the id."""
        _path_id(session_id, "session_id")
        owner = clickstream.session_owner(conn, session_id)
        if owner is not None:
            auth.require_user(who, owner, f"session {session_id}")

    # --- improvement --------------------------------------------------------------------------------

    @app.post("/v1/improvement/run", dependencies=ADMIN,
              summary="Run the improvement loop now over every settled session")
    def run_improvement(self, settle_s: float | None = None) -> dict[str, Any]:
        if settle_s is not None and not 0 <= settle_s <= 86_400:
            raise RequestValidationError([{"loc": ("query", "settle_s"), "msg": "settle_s must be 0 to 86400",
                                           "type": "value_error"}])
        return ray.get(self.driver.improve_now.remote(settle_s))

    @app.post("/v1/improvement/undo", dependencies=ADMIN,
              summary="Forget what anonymous clicks taught: the model's vectors back, the click evidence gone")
    def undo_improvement(self) -> dict[str, Any]:
        blue = self._blue()
        with self.pool.connection() as conn:
            return improve_loop.undo(conn, Collection(blue.collection, blue.dim))

    @app.delete("/v1/users/{user_id}/personalisation",
                summary="Forget everything learned from a user's clicks (that user's token or an API key)")
    def forget_user(self, user_id: str, who: Caller = Depends(auth.someone)) -> dict[str, Any]:
        _path_id(user_id, "user_id")
        auth.require_user(who, user_id, f"the personalisation of user {user_id!r}")
        blue = self._blue()
        with self.pool.connection() as conn:
            deleted = Collection(blue.collection, blue.dim).forget_user(conn, user_id)
        return {"user_id": user_id, "deleted_vectors": deleted}

    @app.post("/v1/users/{user_id}/token", response_model=schemas.UserToken, dependencies=ADMIN,
              summary="Issue a token that lets this user read their sessions and personalised results")
    def issue_user_token(self, user_id: str, request: schemas.TokenRequest | None = None) -> schemas.UserToken:
        _path_id(user_id, "user_id")
        token, expires = auth.authenticator().issue_token(user_id, request.ttl_s if request else None)
        return schemas.UserToken(user_id=user_id, token=token, expires_at=expires)

    # --- tasks: long-running work as Ray jobs -------------------------------------------------------

    @app.post("/v1/tasks/fine-tune", status_code=202, response_model=schemas.TaskOut, dependencies=ADMIN,
              summary="Start a fine-tune from the clickstream (a Ray job); 409 while one runs")
    def start_fine_tune(self, request: schemas.FineTuneRequest) -> schemas.TaskOut:
        return schemas.TaskOut(**_driver_call(self.driver.start_fine_tune.remote(request.config)))

    @app.post("/v1/tasks/reindex", status_code=202, response_model=schemas.TaskOut, dependencies=ADMIN,
              summary="Re-embed every item with a model version into a green collection (a Ray job); 409 while "
                      "a reindex or switch runs, 404 for an unknown version")
    def start_reindex(self, request: schemas.ReindexRequest) -> schemas.TaskOut:
        return schemas.TaskOut(**_driver_call(self.driver.start_reindex.remote(request.to, request.switch, request.hnsw)))

    @app.get("/v1/tasks/{task_id}", response_model=schemas.TaskOut, dependencies=ADMIN,
             summary="A task: status, progress, result")
    def read_task(self, task_id: str) -> schemas.TaskOut:
        _path_id(task_id, "task_id")
        with self.pool.connection() as conn:
            return schemas.TaskOut(**tasks.get(conn, task_id).__dict__)

    @app.get("/v1/tasks", response_model=schemas.TaskList, dependencies=ADMIN, summary="Recent tasks, newest first")
    def list_tasks(self, kind: str | None = Query(None, pattern=f"^({'|'.join(tasks.KINDS)})$",
                                                  description=f"one of {', '.join(tasks.KINDS)}"),
                   limit: int = 20) -> schemas.TaskList:
        if not 1 <= limit <= 200:
            raise RequestValidationError([{"loc": ("query", "limit"), "msg": "limit must be 1 to 200",
                                           "type": "value_error"}])
        with self.pool.connection() as conn:
            return schemas.TaskList(tasks=[schemas.TaskOut(**t.__dict__) for t in tasks.recent(conn, kind, limit)])


    # --- lifecycle: blue/green ------------------------------------------------------------------------

    @app.get("/v1/lifecycle", dependencies=ADMIN,
             summary="Blue, green and previous collections, locks, tasks, switches, models")
    def lifecycle_state(self) -> dict[str, Any]:
        return _driver_call(self.driver.lifecycle_state.remote())

    @app.post("/v1/lifecycle/switch", dependencies=ADMIN,
              summary="Make the complete green collection blue (409 says why not)")
    def switch(self, request: schemas.SwitchRequest) -> dict[str, Any]:
        return _driver_call(self.driver.switch.remote(force=request.force))

    @app.post("/v1/lifecycle/rollback", dependencies=ADMIN,
              summary="Make the previous blue blue again, within its grace period")
    def rollback(self) -> dict[str, Any]:
        return _driver_call(self.driver.rollback.remote())

    @app.post("/v1/lifecycle/cleanup", dependencies=ADMIN,
              summary="Drop the previous collection and unload its model if its grace period is over (or now)")
    def cleanup(self, request: schemas.CleanupRequest) -> dict[str, Any]:
        return _driver_call(self.driver.cleanup.remote(now=request.now))

    # --- web page ---------------------------------------------------------------------------------------
    # Names used here live in the class: Serve serialises the class where it is defined, before any
    # module-level name below it exists.

    WEB_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
                    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    def web_page(self) -> HTMLResponse:
        """Search with click feedback and the lifecycle at a glance (es_ray/serve/web/index.html, read once)."""
        if getattr(self, "_web_page_html", None) is None:
            self._web_page_html = resources.files("es_ray.serve").joinpath("web/index.html").read_text(encoding="utf-8")
        return HTMLResponse(self._web_page_html, headers={"Content-Security-Policy": self.WEB_PAGE_CSP})


def build_app(args: dict[str, Any] | None = None):
    """Serve application builder (import path es_ray.serve.app:build_app, see configs/serve.yaml)."""
    args = args or {}
    return SearchAPI.options(num_replicas=int(args.get("replicas", 1))).bind(args.get("namespace", "es-ray"),
                                                                          args.get("settings_version", ""))
