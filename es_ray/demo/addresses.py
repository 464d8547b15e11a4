"""A loopback address for each simulated person, so that the server sees distinct clients.

es-ray tells clients apart by address (es_ray/serve/clients.py): its rate limits are per client, and its
learning weighs how many distinct clients taught something. Simulated people sending from one process
would all be 127.0.0.1, one client at a thousand times a person's rate. Linux routes all of 127.0.0.0/8
to the loopback interface, so each person gets an address of its own there and the client binds its
connections to it (EsRayClient(local_address=...)).

Addresses are 127.<crowd>.<high>.<low>: a crowd per kind of simulated traffic (users who click, the
demo's background searches, quality measurement), so their people never share an address. 127.0.x.x
is left alone (127.0.0.1 is the stack's own address; resolvers listen on others there).
"""

from __future__ import annotations

USERS, TRAFFIC, MEASUREMENT = 1, 2, 3   # crowds
PEOPLE_PER_CROWD = 256 * 254             # low byte 1..254: no .0 or .255, which some tools treat specially


def person_address(crowd: int, person: int) -> str:
    """The loopback address of simulated person number `person` (wrapping past PEOPLE_PER_CROWD)."""
    if not 1 <= crowd <= 255:
        raise ValueError(f"crowd {crowd} is not in 1..255")
    n = person % PEOPLE_PER_CROWD
    return f"127.{crowd}.{n // 254}.{n % 254 + 1}"
