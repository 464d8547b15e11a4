"""Which client sent a request: its identity is recorded with every session, so that what one client
taught can be told from what many did, and the rate limits and the fusion exploration count it.

An IPv6 client is its /64 network: an ordinary host owns a whole /64 and can send from any address in
it, so counting addresses would let one host pass for as many clients as it likes (the learners' distinct
clients, learning.min_clients, and each limit per client).

By default a client is its peer address. Behind a proxy (a KubeRay ingress) every peer is the proxy, so
the address the proxy appends to X-Forwarded-For is used instead, but only when the peer is one of
clients.trusted_proxies: anyone else can write any X-Forwarded-For they like. The header is read from
the right (the entry the nearest proxy appended) past further trusted proxies; the first address not
trusted is the client.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from fastapi import Depends, Request

from es_ray.serve.replica import Replica, replica

FORWARDED_FOR = "X-Forwarded-For"
IPV6_CLIENT_PREFIX = 64
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def trusted_networks(proxies: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def identify(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The client identity of a request from `peer` carrying `forwarded_for` (None: no header)."""
    client = _address(peer or "")
    if client is None:
        return peer or "unknown"  # not an IP peer (a Unix socket, a test client): its name as given
    if forwarded_for:
        for entry in reversed(forwarded_for.split(",")):
            if not any(client in network for network in trusted):
                break
            hop = _address(entry)
            if hop is None:
                break  # not an address: the trusted hop before it is all that is known
            client = hop
    return _counted(client)


def _counted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An address as a client: IPv4 as itself, IPv6 as its /64 (an IPv4 client on a dual-stack socket
    as its IPv4 address)."""
    if address.version == 4:
        return str(address)
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/{IPV6_CLIENT_PREFIX}", strict=False))


async def client_identity(request: Request, state: Replica = Depends(replica)) -> str:
    """FastAPI dependency: the identity of the client that sent this request."""
    return identify(request.client.host if request.client else None, request.headers.get(FORWARDED_FOR),
                    trusted_networks(tuple(state.settings.clients.trusted_proxies)))
