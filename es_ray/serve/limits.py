"""Request size limit: a body over serve.max_body_bytes (serve.max_search_body_bytes for a search, the public
route anyone can flood) is refused with 413 before it is parsed.

Pure ASGI, so it sees the body as it arrives: a Content-Length over the limit is refused at once, and
a chunked body is counted and cut off as soon as it passes the limit. (Starlette's own limit answers a
bare "Content Too Large"; this one says the size and the setting, in the API's error format.)
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException

from es_ray.serve import schemas


SEARCH = "/v1/search"


def _limit(path: str) -> tuple[int, str]:
    """The body limit of a path and the setting that holds it."""
    if path == SEARCH:
        return schemas.LIMITS.max_search_body_bytes, "serve.max_search_body_bytes"
    return schemas.LIMITS.max_body_bytes, "serve.max_body_bytes"


def _message(length: str, limit: int, setting: str) -> str:
    return f"request body is {length} bytes; the limit is {limit} ({setting})"


class BodyTooLarge(HTTPException):
    """Raised while the body is read: FastAPI passes HTTPExceptions on, so the app answers 413."""

    def __init__(self, limit: int, setting: str):
        super().__init__(status_code=413, detail=_message(f"more than {limit}", limit, setting))


class BodySizeLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, setting = _limit(scope.get("path", ""))
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _too_large(send, limit, setting, length.decode("latin-1")[:20])
        received, started = 0, False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, setting)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit, setting, f"more than {limit}")


async def _too_large(send, limit: int, setting: str, length: str) -> None:
    body = json.dumps({"error": _message(length, limit, setting), "details": []}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
