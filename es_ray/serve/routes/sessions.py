"""The clickstream: sessions (result lists shown), their click events and irrelevant marks.

Who may write what: a session search returned has a signed id (auth.py), and anyone who has it may
click on it (auth.public_clickstream). A session shown by another system is recorded only with an API
key, and takes clicks only with a key (or its own user's token): an id anyone could have picked teaches
nothing from anyone.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends

from es_ray import metrics
from es_ray.serve import auth, clients, rate_limits, schemas
from es_ray.serve.auth import Caller
from es_ray.serve.errors import path_id
from es_ray.serve.replica import Replica, replica
from es_ray.store import clickstream

router = APIRouter()
# Per client first: a client over its own limit is refused before it takes a slot of the session's.
CLICKSTREAM_LIMITS = [Depends(rate_limits.clickstream), Depends(rate_limits.session_writes)]


@router.post("/v1/sessions", response_model=schemas.SessionCreated,
             summary="Record a result list shown by another system (an API key)",
             description="Sessions of es-ray's own searches are recorded by POST /v1/search. A result list "
                         "shown elsewhere is recorded with its source `ingested` and the API key's name; "
                         "its clicks too need the key (or the token of the session's user).")
def create_session(request: schemas.SessionRequest, who: Caller = Depends(auth.ingester),
                   state: Replica = Depends(replica), client: str = Depends(clients.client_identity)
                   ) -> schemas.SessionCreated:
    session_id = request.session_id or uuid.uuid4().hex
    with state.pool.connection() as conn:
        created = clickstream.record_session(conn, session_id, request.user_id, request.query, None,
                                             [(r.rank, r.id) for r in request.results],
                                             clickstream.Provenance("ingested", who.key_name, client))
    if created:
        metrics.count("es_ray_sessions", source="external")
    return schemas.SessionCreated(session_id=session_id, created=created)


@router.get("/v1/sessions/{session_id}", response_model=schemas.SessionOut,
            dependencies=[Depends(rate_limits.session_reads)],
            summary="A session with its events (its user's token or an API key)")
def read_session(session_id: str, who: Caller = Depends(auth.someone),
                 state: Replica = Depends(replica)) -> schemas.SessionOut:
    path_id(session_id, "session_id")
    with state.pool.connection() as conn:
        auth.require_user(who, clickstream.session_owner(conn, session_id), f"session {session_id}")
        session = clickstream.get_session(conn, session_id)
    return schemas.SessionOut(**{**session.__dict__,
                                 "results": [{"id": i, "rank": r, "dense_rank": session.list_ranks[i][0],
                                              "lexical_rank": session.list_ranks[i][1]} for r, i in session.results]})


@router.post("/v1/sessions/{session_id}/events", response_model=schemas.EventsResponse,
             dependencies=CLICKSTREAM_LIMITS,
             summary="Record clicks on shown results; idempotent by event_id within the session, all or nothing")
async def add_events(session_id: str, request: schemas.EventsRequest, who: Caller = Depends(auth.clickstream_writer),
                     state: Replica = Depends(replica)) -> schemas.EventsResponse:
    # Async, its Postgres work on the replica's threads (Replica.run_blocking): the public write path that
    # clients call most, as search is the public read path.
    accepted, duplicates = await state.run_blocking(_add_events, session_id, request, who, state)
    metrics.count("es_ray_click_events", accepted, result="accepted")
    metrics.count("es_ray_click_events", duplicates, result="duplicate")
    return schemas.EventsResponse(accepted=accepted, duplicates=duplicates)


def _add_events(session_id: str, request: schemas.EventsRequest, who: Caller, state: Replica) -> tuple[int, int]:
    with state.pool.connection() as conn:
        _check_writer(conn, who, session_id)
        return clickstream.add_events(conn, session_id, [(e.event_id, e.item_id, e.type) for e in request.events])


@router.post("/v1/sessions/{session_id}/irrelevant", summary="Mark the whole result list as irrelevant",
             dependencies=CLICKSTREAM_LIMITS)
def mark_irrelevant(session_id: str, who: Caller = Depends(auth.clickstream_writer),
                    state: Replica = Depends(replica)) -> dict[str, Any]:
    with state.pool.connection() as conn:
        _check_writer(conn, who, session_id)
        clickstream.mark_irrelevant(conn, session_id)
    metrics.count("es_ray_irrelevant_marks")
    return {"session_id": session_id, "irrelevant": True}


def _check_writer(conn, who: Caller, session_id: str) -> None:
    """Raises unless the caller may write to this session: a user's session only that user (or an
    admin); an anonymous one anyone if search served it (its id is signed), else only an admin."""
    path_id(session_id, "session_id")
    served = auth.authenticator().served_session(session_id)
    if not (served or who.admin or who.user_id):
        # Refused before the lookup: an id nobody was given tells nothing, not even whether it exists.
        raise _not_served(session_id)
    owner = clickstream.session_owner(conn, session_id)
    if owner is not None:
        auth.require_user(who, owner, f"session {session_id}")
    elif not (served or who.admin):
        raise _not_served(session_id)


def _not_served(session_id: str):
    return auth.forbidden(f"session {session_id} was not returned by this es-ray's search: its clicks need "
                          f"an API key ({auth.API_KEY_HEADER})")
