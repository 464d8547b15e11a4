"""The search benchmark's HTTP load client: one keep-alive connection per client thread on the standard
library's http.client.

The clients run on the machine they measure, so what they spend per request is taken from the stack.
httpx (es_ray.client) builds each request through its auth flow, event hooks, cookie jar and h11's state
machine: on this machine kind it spent about 1.6 ms of CPU per search at 8 clients, more than Serve's proxy
and the raylet together. This client sends the same request (method, path, JSON body, the API key) and
reads the whole answer; the search benchmark reports what each client costs in the same run.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from pydantic import BaseModel

from es_ray.serve.auth import API_KEY_HEADER
from es_ray.stack.credentials import local_api_key
from es_ray.stack.manifest import StackManifest


class LeanClient:
    """One connection to the stack's serving address, reopened after a failure. Not thread-safe: one per
    client thread."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 60.0):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port, timeout
        self.headers = {"Content-Type": "application/json", **({API_KEY_HEADER: api_key} if api_key else {})}
        self.conn: http.client.HTTPConnection | None = None

    @classmethod
    def for_stack(cls, manifest: StackManifest, timeout: float = 60.0) -> "LeanClient":
        return cls(manifest.serve_url, local_api_key(manifest.state_dir), timeout)

    def send(self, method: str, path: str, request: BaseModel | None = None) -> int:
        """The answer's status after reading its whole body; 0 where the exchange failed (the connection
        is opened again for the next request)."""
        body = None if request is None else json.dumps(request.model_dump(mode="json", exclude_none=True))
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers=self.headers)
            response = self.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.close()
            return 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "LeanClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
