"""POST /v1/search: embed the query, one SQL query over the blue collection, record the session. The
request's mode picks the ranking (store/search.py search_mode): dense, lexical (no embedding) or hybrid.

The route is async and hands its blocking work (tokenise + Triton, the search, the session record) to the
replica's threads as one call, and the search and its session share one connection of the replica's search
pool, whose connections carry the search's statement timeout and run in autocommit (db.open_pool): a dense
search with its session is two round trips to Postgres, the search's SELECT and the session's INSERT. Where a
search's time goes: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from fastapi import APIRouter, Depends

from es_ray import metrics
from es_ray.config import SearchSettings
from es_ray.inference.triton_client import TritonUnavailable
from es_ray.serve import auth, clients, exploration, fusion_exploration, rate_limits, schemas
from es_ray.serve.auth import Caller
from es_ray.serve.errors import ServiceUnavailable
from es_ray.serve.replica import Replica, replica
from es_ray.store import clickstream, db
from es_ray.store.blue_green import Blue
from es_ray.store.collections import Collection
from es_ray.store.fusion import Fusion
from es_ray.store.search import LexicalList, Ranking, hybrid_lexical, search_mode

router = APIRouter()


@router.post("/v1/search", response_model=schemas.SearchResponse, summary="Semantic, lexical or hybrid search over the blue collection",
             dependencies=[Depends(rate_limits.search)],
             description="Results come best first, except that a first page recorded as an anonymous session has "
                         "one adjacent pair among its top results exchanged in a small share of searches "
                         "(serve.swap_share): these randomised swaps let es-ray learn how much attention each "
                         "rank gets. The session records the order shown. In hybrid mode, a small share of "
                         "(query, client) pairs of recorded, anonymous, unfiltered searches is ranked by another "
                         "fusion (search.fusion_explore_share; `fusion` names it), the same one for every page "
                         "of that client's query: this lets es-ray learn the fusion from clicks. Searches with "
                         "session=false or a user_id are never swapped or explored.")
async def search(request: schemas.SearchRequest, who: Caller = Depends(auth.searcher),
                 state: Replica = Depends(replica), client: str = Depends(clients.client_identity)
                 ) -> schemas.SearchResponse:
    if request.user_id is not None:
        auth.require_user(who, request.user_id, f"personalised search for user {request.user_id!r}")
    return await state.run_blocking(_search, request, who, state, client, state.blue())


def _search(request: schemas.SearchRequest, who: Caller, state: Replica, client: str,
            blue: Blue) -> schemas.SearchResponse:
    started, status = time.monotonic(), "unavailable"
    session_id, searched = None, None
    try:
        ranking = _explored(state.settings.search, request, client,
                            _ranking(state.settings.search, request.mode, state.blue_watcher.fusions.get(blue.collection)))
        collection = Collection(blue.collection, blue.dim)
        words = _lexical_beside(state, collection, ranking, request) if ranking.mode == "hybrid" else None
        vector = None if ranking.mode == "lexical" else state.query_vectors.get(blue, request.query)  # lexical: none
        with state.search_pool.connection() as conn:  # its statement timeout bounds the search
            hits = search_mode(conn, collection, ranking, request.query, vector, request.limit, request.offset,
                               request.filter, request.user_id, words=words)
            status, searched = "ok", time.monotonic()  # the latency metric is embed + pgvector
            if request.session and hits:
                hits, session_id = _record_session(conn, request, who, state, client, blue, hits, ranking.mode)
    except TritonUnavailable as err:
        raise ServiceUnavailable(f"embedding service unavailable: {err}") from err
    except db.OperationalError as err:
        raise ServiceUnavailable(f"database unavailable: {err}") from err
    finally:
        metrics.count("es_ray_search_requests", model=blue.model_version, status=status)
        metrics.observe("es_ray_search_latency_ms", ((searched or time.monotonic()) - started) * 1000,
                        model=blue.model_version)
    return schemas.SearchResponse(model=f"v{blue.model_version}", session_id=session_id,
                                  fusion=ranking.fusion.label() if ranking.mode == "hybrid" else None,
                                  results=[schemas.SearchResult(id=h.id, score=h.score, payload=h.payload)
                                           for h in hits])


def _lexical_beside(state: Replica, collection: Collection, ranking: Ranking,
                    request: schemas.SearchRequest) -> Callable[[], LexicalList] | None:
    """Starts reading hybrid's lexical list on a second pooled connection, so Postgres ranks it while
    Triton embeds the query and the dense list is read (two cores: the two overlap); returns where its
    result will be. None when the pool has no connection to spare at once: then search_mode reads it
    after the dense list on the request's own connection (a full pool is not waited for: under load,
    waiting would cost more than the overlap gains)."""
    pool = state.search_pool
    stats = pool.get_stats()
    if stats.get("pool_available", 0) == 0 and stats.get("pool_size", 0) >= stats.get("pool_max", 0):
        return None
    try:
        conn = pool.getconn(timeout=0.01)  # a pool below its size opens one; more than 10 ms: not worth it
    except db.OperationalError:  # PoolTimeout
        return None

    def read() -> LexicalList:
        try:
            return hybrid_lexical(conn, collection, ranking, request.query, request.filter)
        finally:
            pool.putconn(conn)

    return state.beside.submit(read).result  # on one of the replica's threads beside the request's


def _ranking(search: SearchSettings, mode: str | None, learned: Fusion | None = None) -> Ranking:
    """The request's mode (search.default_mode when it names none) with the collection's promoted fusion
    (learned from clicks, store/fusion_weights.py), else the configured one."""
    fusion = learned or Fusion.configured(search)
    return Ranking(mode or search.default_mode, fusion, search.depth, search.text_search_config,
                   search.lexical_common_share, search.max_query_terms)


def _explored(search: SearchSettings, request: schemas.SearchRequest, client: str, ranking: Ranking) -> Ranking:
    """The ranking, with another fusion of the learner's grid where exploration draws one for this
    (query, client) (serve/fusion_exploration.py): anonymous, unfiltered hybrid searches that record a
    session. Drawn before the search, from neither offset nor limit, so all its pages agree."""
    if ranking.mode != "hybrid" or not request.session or request.user_id is not None or request.filter:
        return ranking
    choices = fusion_exploration.alternatives(ranking.fusion, search.learned_lexical_weights, search.learned_rrf_ks,
                                              search.fusion_explore_over)
    drawn = fusion_exploration.draw(auth.authenticator().derived_key("fusion exploration"), request.query,
                                    client, search.fusion_explore_share, choices)
    return ranking if drawn is None else dataclasses.replace(ranking, fusion=drawn)


def _record_session(conn, request: schemas.SearchRequest, who: Caller, state: Replica, client: str, blue: Blue,
                    hits: list, mode: str) -> tuple[list, str]:
    """The shown list (with its exploration swap, if any) recorded as a session on the search's connection."""
    swap = None
    if request.user_id is None and request.offset == 0:  # a user's own ranking is never explored
        swap = exploration.choose_swap(len(hits), state.settings.serve.swap_share,
                                       state.settings.serve.swap_max_rank, state.random)
        hits = exploration.swapped(hits, swap)
    session_id = auth.authenticator().new_session_id()  # signed: clicks on it need no credential
    clickstream.record_session(conn, session_id, request.user_id, request.query, blue.model_version,
                               [(request.offset + rank, h.id) for rank, h in enumerate(hits, start=1)],
                               clickstream.Provenance("served", who.key_name, client), swap,
                               filtered=bool(request.filter),  # a filter can show any item for any query
                               mode=mode, list_ranks={h.id: (h.dense_rank, h.lexical_rank) for h in hits})
    metrics.count("es_ray_sessions", source="search")
    return hits, session_id
