"""The API's errors: every one is answered as JSON {"error": message, "details": [...]} with its status.

Domain errors raised by the store or by the lifecycle driver map to 4xx here (CLIENT_ERRORS), a missing
dependency (Triton, Postgres, no blue model yet) to 503 with Retry-After, and FastAPI's own validation
and HTTP errors are rewritten into the same body.
"""

from __future__ import annotations

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from es_ray.lifecycle.handle import UnknownModel
from es_ray.lifecycle.switching import SwitchRefused
from es_ray.serve import schemas
from es_ray.store import clickstream, db, tasks


class ServiceUnavailable(Exception):
    """A dependency is not there (yet): 503, and the client may retry."""


# Domain errors -> HTTP status, each answered as {"error": message, "details": []}.
CLIENT_ERRORS = {clickstream.UnknownSession: 404, clickstream.EventRejected: 422, clickstream.Conflict: 409,
                 tasks.UnknownTask: 404, tasks.TaskConflict: 409, SwitchRefused: 409, UnknownModel: 404}


def driver_call(ref):
    """The driver's answer; a domain error raised in the actor is re-raised as itself (not Ray's wrapper)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, tuple(CLIENT_ERRORS)):
            raise cause from None
        raise


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
    for error, status in CLIENT_ERRORS.items():
        app.add_exception_handler(error, _client_error(status))
    app.add_exception_handler(db.OperationalError, _database_down)
