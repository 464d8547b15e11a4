"""A user's own data: forgetting their personalisation, issuing their token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from es_ray.improve import forgetting
from es_ray.serve import auth, schemas
from es_ray.serve.auth import Caller
from es_ray.serve.errors import path_id
from es_ray.serve.replica import Replica, replica
from es_ray.serve.routes import ADMIN

router = APIRouter()


@router.delete("/v1/users/{user_id}/personalisation",
               summary="Forget everything learned from a user's clicks, in every collection, and their sessions "
                       "(that user's token or an API key)")
def forget_user(user_id: str, who: Caller = Depends(auth.someone), state: Replica = Depends(replica)) -> dict[str, Any]:
    path_id(user_id, "user_id")
    auth.require_user(who, user_id, f"the personalisation of user {user_id!r}")
    with state.pool.connection() as conn:
        return forgetting.forget_user(conn, user_id)


@router.post("/v1/users/{user_id}/token", response_model=schemas.UserToken, dependencies=ADMIN,
             summary="Issue a token that lets this user read their sessions and personalised results")
def issue_user_token(user_id: str, request: schemas.TokenRequest | None = None) -> schemas.UserToken:
    path_id(user_id, "user_id")
    token, expires = auth.authenticator().issue_token(user_id, request.ttl_s if request else None)
    return schemas.UserToken(user_id=user_id, token=token, expires_at=expires)
