"""The API's errors: every one is answered as JSON {"error": message, "details": [...]} with its status.

Domain errors raised by the store or by the lifecycle driver map to 4xx here (CLIENT_ERRORS), a missing
dependency (Triton, Postgres, no blue model yet) to 503 with Retry-After, a request over a rate limit
(rate_limits.py) to 429 with Retry-After, and FastAPI's own validation
and HTTP errors are rewritten into the same body.

A search Postgres cancelled at its statement timeout is a 503 with Retry-After, not a 422: the filter's
size is already bounded (serve.filter_limits, refused with 422 before any SQL runs), so what is left
is a query whose cost depends on the data and the load of the moment (the same filter is fast on a
quiet database, slow behind a reindex). A 4xx would tell a client never to send a valid request again;
the Retry-After spaces out the retries, and the message says a narrower filter is cheaper.
"""

from __future__ import annotations

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from es_ray.data.dual_write import LifecycleMoved
from es_ray.lifecycle.handle import UnknownModel
from es_ray.lifecycle.switching import SwitchRefused
from es_ray.serve import schemas
from es_ray.store import clickstream, db, tasks
from es_ray.store.search import SearchTimeout


class ServiceUnavailable(Exception):
    """A dependency is not there (yet): 503, and the client may retry."""


class RateLimited(Exception):
    """Over the serve.rate_limits entry `name` (rate_limits.py): 429, retry after `retry_after_s`."""

    def __init__(self, message: str, name: str, retry_after_s: int):
        super().__init__(message)
        self.name, self.retry_after_s = name, retry_after_s


# Domain errors -> HTTP status, each answered as {"error": message, "details": []}.
CLIENT_ERRORS = {clickstream.UnknownSession: 404, clickstream.EventRejected: 422, clickstream.Conflict: 409,
                 tasks.UnknownTask: 404, tasks.TaskConflict: 409, SwitchRefused: 409, UnknownModel: 404}


def driver_call(ref):
    """The driver's answer; a domain error raised in the actor is re-raised as itself (not Ray's wrapper).
    A driver that died or is restarting (Ray restarts it) is a 503: the client may retry."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, tuple(CLIENT_ERRORS)):
            raise cause from None
        raise
    except ray.exceptions.RayActorError as err:  # ActorDiedError and ActorUnavailableError among them
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise ServiceUnavailable(f"lifecycle driver unavailable ({type(err).__name__}): {first_line}") from err


def path_id(value: str, field: str) -> str:
    """Path parameters get the same checks as ids in bodies (length, NUL, valid unicode): 422, not 500."""
    try:
        return schemas.check_id(value)
    except ValueError as err:
        raise invalid("path", field, str(err)) from None


def invalid(location: str, field: str, message: str) -> RequestValidationError:
    """A 422 for one parameter that FastAPI's own validation cannot express."""
    return RequestValidationError([{"loc": (location, field), "msg": message, "type": "value_error"}])


def _field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location if part != "body") or "body"


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """401, 403, 404 for unknown paths, 405: the same {"error", "details"} body as every other error."""
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail), "details": []},
                        headers=getattr(exc, "headers", None))


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


async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": "1"})


async def _search_timeout(request: Request, exc: SearchTimeout) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": f"{exc}; retry later, or narrow the filter", "details": []},
                        headers={"Retry-After": "2"})


async def _lifecycle_moved(request: Request, exc: LifecycleMoved) -> JSONResponse:
    # The live collections kept changing (a switch, green appearing) or Postgres kept breaking deadlocks:
    # nothing was written, and the same request succeeds once the move is done.
    return JSONResponse(status_code=503, content={"error": str(exc), "details": []}, headers={"Retry-After": "1"})


async def _rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
    return JSONResponse(status_code=429, content={"error": str(exc), "details": []},
                        headers={"Retry-After": str(exc.retry_after_s)})


async def _database_down(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"error": f"database unavailable: {exc}"}, headers={"Retry-After": "1"})


def _client_error(status: int):
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": str(exc), "details": []})
    return handler


def install(app: FastAPI) -> None:
    """Registers every handler above on the app."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(SearchTimeout, _search_timeout)
    app.add_exception_handler(LifecycleMoved, _lifecycle_moved)
    app.add_exception_handler(RateLimited, _rate_limited)
    for error, status in CLIENT_ERRORS.items():
        app.add_exception_handler(error, _client_error(status))
    app.add_exception_handler(db.OperationalError, _database_down)
