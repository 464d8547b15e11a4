"""The direct-ingress replica binds serve.port with SO_REUSEADDR, so its successor gets the port at once.

Ray Serve 2.60's replica starts its direct-ingress HTTP server through `start_asgi_http_server` with
`enable_so_reuseport=False`, and that flag is the only thing that sets SO_REUSEADDR on the socket. Without
it a new replica cannot bind serve.port while the connections of the one before it sit in TIME_WAIT or
FIN_WAIT (up to 60 s): after a killed replica, or an `es-ray up` that replaced the app, serve.port went
unanswered for 40-58 s (docs/PERFORMANCE.md). Upstream sets SO_REUSEADDR unconditionally since
ray-project/ray#60615; this does the same for the replica of 2.60, and nothing else: SO_REUSEADDR lets a
socket bind over connections that are closing, never over a socket that still listens, so two replicas
can still not share the port (SO_REUSEPORT, which would allow that, is left off).

It runs in the replica process, from SearchAPI's constructor: Serve starts the direct-ingress server after
the constructor returns (replica.py `_on_initialized`). The proxy's own server is untouched (another process).
"""

from __future__ import annotations

import functools
import socket

from ray.serve._private import http_util
from ray.serve._private import replica as serve_replica


def _reuse_address_only(sock: socket.socket) -> bool:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return True


def bind_replica_port_with_reuse_address() -> None:
    """Makes the replica's direct-ingress server socket SO_REUSEADDR (idempotent)."""
    start = serve_replica.start_asgi_http_server
    if getattr(start, "es_ray_reuse_address", False):
        return

    @functools.wraps(start)
    async def start_with_reuse_address(*args, **kwargs):
        # Serve's switch for socket options sets SO_REUSEADDR and SO_REUSEPORT through
        # set_socket_reuse_port; here that sets SO_REUSEADDR alone (see the module's docstring).
        kwargs["enable_so_reuseport"] = True
        return await start(*args, **kwargs)

    start_with_reuse_address.es_ray_reuse_address = True  # type: ignore[attr-defined]
    http_util.set_socket_reuse_port = _reuse_address_only
    serve_replica.start_asgi_http_server = start_with_reuse_address
