"""Exploration of the hybrid fusion: a small share of searches is ranked by another fusion of the
learner's grid, so that the click log shows, and labels, items that other fusions would surface.

Why: the fusion learner (train/fusion_weights.py) re-fuses the logged pages, and labels exist only for
items some page showed. If every page is ranked by the serving fusion, an item that only another fusion
would put on the first page is never shown, never clicked, and that fusion gets no credit for it: the
serving fusion wins on its own log (bias 1 in the learner's docstring), and the learner never moves. A
page ranked by another fusion shows those items to a few people. Exploring the current ranker's
neighbours is the dueling-bandit recipe (Yue & Joachims, "Interactively Optimizing Information Retrieval
Systems as a Dueling Bandits Problem", ICML 2009): a neighbour is near the current fusion in quality, so
each explored page costs its reader little, and a learner that moves one step at a time needs labels
only for its neighbours. search.fusion_explore_over: grid draws from the whole grid instead.

Which searches: hybrid searches that record a session, anonymous (no user_id: a user's own ranking is
what they asked for) and unfiltered (a filtered session never teaches the fusion, learning_guards.py
rule 1: exploring it would cost its reader and teach nothing). The serving fusion must be RRF (the grid's
method). Searches with session=false are never explored: they are measurement and API use, not people
reading pages whose clicks teach.

The draw is a keyed hash, not a random number, because pages are by offset: every page one person reads
of one query must come from the same ranking, or pages overlap or leave gaps. HMAC-SHA256, under a key
made from auth.user_token_secret, of the normalised query and the client (serve/clients.py: an IPv6
client is its /64) decides whether, of the query alone which fusion: the same person paging (or
searching again) sees one fusion, named in the response's `fusion` field; whether a person is explored is
drawn independently of the others, and every explored reader of a query meets the same fusion. A client
can redraw only its own pages (by rewording its query beyond case and spacing), never choose among the
fusions, and since its own identity is in the hash, nothing it sends changes what anybody else sees; the
secret keeps it from computing in advance which of its queries are explored (the response says so only
after the search). There is no time
bucket in the hash: a bucket's edge falling between two pages of one reading would break that reading's
paging. The draw changes with the serving fusion (a promotion moves the neighbours), which changes every
page anyway.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

from es_ray.store.clickstream import normalise_query
from es_ray.store.fusion import Fusion, grid


def alternatives(current: Fusion, lexical_weights: list[float], ks: list[float],
                 over: Literal["neighbours", "grid"]) -> list[Fusion]:
    """The fusions an explored search may be ranked by, in a fixed order; never the current one.
    neighbours: one step from the current fusion along one of the grid's two axes (the next larger or
    smaller lexical weight at its k, the next larger or smaller k at its weight), measured from the grid
    point nearest it (that point too when the current fusion is off the grid). grid: every other fusion."""
    if current.method != "rrf":
        return []
    if over == "grid":
        return [f for f in grid(lexical_weights, ks, current.dense_weight) if f != current]
    weights, constants = sorted(set(map(float, lexical_weights))), sorted(set(map(float, ks)))

    def nearest(values: list[float], value: float) -> int:
        return min(range(len(values)), key=lambda n: (abs(values[n] - value), n))

    w, k = nearest(weights, current.lexical_weight), nearest(constants, current.k)
    steps = [(k, w), (k, w - 1), (k, w + 1), (k - 1, w), (k + 1, w)]
    out = [Fusion("rrf", constants[a], current.dense_weight, weights[b]) for a, b in steps
           if 0 <= a < len(constants) and 0 <= b < len(weights)]
    return [f for f in out if f != current]


def draw(key: bytes, query: str, client: str, share: float, choices: list[Fusion]) -> Fusion | None:
    """The fusion that ranks this (query, client)'s pages instead of the serving one, in `share` of the
    (query, client) pairs; None: the serving one. Deterministic in its arguments. Which of `choices`
    depends on the query alone (uniform over queries): every explored reader of one query sees the same
    other fusion, so an item only it surfaces gathers clicks from several people, as the learning guards
    ask before a click teaches (learning.min_clients), instead of being spread over all the choices.
    `client`: the client identity (serve/clients.py, an IPv6 client as its /64). No key (no secret): never."""
    if not key or not choices or share <= 0:
        return None
    # The normalised query holds no newline (whitespace is collapsed), so each message is unambiguous.
    query = normalise_query(query)
    whether = hmac.new(key, f"explore\n{query}\n{client}".encode(), hashlib.sha256).digest()
    if int.from_bytes(whether[:8], "big") / 2**64 >= share:
        return None
    which = hmac.new(key, f"fusion\n{query}".encode(), hashlib.sha256).digest()
    return choices[int.from_bytes(which[:8], "big") % len(choices)]
