"""Who may call what: API keys for admin and write routes, signed tokens for a user's own data.

- API keys are random strings; configuration holds only their SHA-256 (auth.api_keys), and a key is
  checked by hashing it and comparing with every configured hash in constant time.
- A user token is `u1.<user id, base64url>.<expiry, unix s>.<HMAC-SHA256>`, issued by an admin
  (POST /v1/users/{user_id}/token) and checked without a database: it proves "this caller is that user"
  until it expires. Rotating auth.user_token_secret revokes every token.
- A served session id is `s1.<random, hex>.<HMAC-SHA256>`, signed with the same secret when search records
  a session: clicks on it are taken without a credential because it proves es-ray itself showed that
  result list. A session recorded any other way (POST /v1/sessions) needs an API key, and so do its
  clicks, unless it is a user's and that user's token comes with them.

Routes declare what they need with the FastAPI dependencies at the bottom; an API key is an admin
credential and also passes every user check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader

from es_ray import metrics
from es_ray.config import AuthSettings

API_KEY_HEADER = "X-API-Key"
USER_TOKEN_HEADER = "X-User-Token"
TOKEN_PREFIX = "u1"
SESSION_PREFIX = "s1"   # not TOKEN_PREFIX: a user token is never a valid session id, nor the reverse


def new_api_key() -> str:
    return "esr_" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Caller:
    """The credential a request carried: an API key (admin), a user's token, or nothing."""

    admin: bool = False
    key_name: str | None = None
    user_id: str | None = None

    def may_act_as(self, user_id: str | None) -> bool:
        return self.admin or (user_id is not None and self.user_id == user_id)


class Authenticator:
    def __init__(self, settings: AuthSettings):
        self.settings = settings
        self._hashes = [(entry.name, bytes.fromhex(entry.sha256)) for entry in settings.api_keys]
        self._secret = settings.user_token_secret.encode()
        self._derived: dict[str, bytes] = {}   # derived_key's, made once per purpose (search asks every time)

    def key_name(self, key: str | None) -> str | None:
        """The configured name of a valid key, else None. Every hash is compared, so the time taken
        does not depend on which (if any) matched."""
        if not key:
            return None
        presented = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for name, digest in self._hashes:
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found

    def issue_token(self, user_id: str, ttl_s: float | None = None) -> tuple[str, int]:
        expires = int(time.time() + (ttl_s or self.settings.user_token_ttl_s))
        body = f"{TOKEN_PREFIX}.{_b64(user_id.encode())}.{expires}"
        return f"{body}.{self._sign(body)}", expires

    def token_user(self, token: str | None) -> str | None:
        """The user a valid, unexpired token was issued for, else None."""
        if not token or not self._secret or len(token) > 2048:
            return None
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != TOKEN_PREFIX:
            return None
        body = ".".join(parts[:3])
        # As bytes: compare_digest refuses str with non-ASCII characters (TypeError, a 500).
        if not hmac.compare_digest(self._sign(body).encode(), parts[3].encode("utf-8", "surrogatepass")):
            return None
        try:
            user_id, expires = _unb64(parts[1]).decode("utf-8"), int(parts[2])
        except ValueError:
            return None
        return user_id if expires > time.time() else None

    def new_session_id(self) -> str:
        """A fresh session id that only this stack's search can make (see served_session)."""
        if not self._secret:
            raise RuntimeError("auth.user_token_secret is empty: served session ids cannot be signed")
        body = f"{SESSION_PREFIX}.{secrets.token_hex(16)}"
        return f"{body}.{self._sign(body)}"

    def served_session(self, session_id: str | None) -> bool:
        """Whether the id was made by new_session_id with this secret."""
        if not session_id or not self._secret or len(session_id) > 256:
            return False
        body, _, signature = session_id.rpartition(".")
        if not body.startswith(SESSION_PREFIX + ".") or not body.isascii() or not signature.isascii():
            return False  # compare_digest refuses non-ASCII str: a TypeError would be a 500
        return hmac.compare_digest(self._sign(body), signature)

    def derived_key(self, purpose: str) -> bytes:
        """A key of its own for `purpose` (e.g. search's fusion exploration), made from the secret: it is
        never shown, so nobody can compute what it decides. Empty when the secret is."""
        if purpose not in self._derived:
            self._derived[purpose] = hmac.new(self._secret, f"es-ray key: {purpose}".encode(),
                                              hashlib.sha256).digest() if self._secret else b""
        return self._derived[purpose]

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())


_authenticator: Authenticator | None = None


def configure(settings: AuthSettings) -> None:
    """Called once per Serve replica with the stack's settings."""
    global _authenticator
    _authenticator = Authenticator(settings)


def authenticator() -> Authenticator:
    if _authenticator is None:
        raise RuntimeError("auth.configure() has not run in this process")
    return _authenticator


# --- FastAPI dependencies ----------------------------------------------------------------------------

_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, scheme_name="ApiKey",
                        description="An API key (admin): its SHA-256 is in auth.api_keys.")
_user_token = APIKeyHeader(name=USER_TOKEN_HEADER, auto_error=False, scheme_name="UserToken",
                           description="A user's token from POST /v1/users/{user_id}/token.")


def unauthorized(message: str) -> HTTPException:
    metrics.count("es_ray_auth_refusals", status="401")
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": API_KEY_HEADER})


def forbidden(message: str) -> HTTPException:
    metrics.count("es_ray_auth_refusals", status="403")
    return HTTPException(status_code=403, detail=message)


async def caller(key: str | None = Security(_api_key), token: str | None = Security(_user_token)) -> Caller:
    """Whoever the request says it is; a credential that is present but wrong is refused outright."""
    if key is not None:
        return _key_caller(key)
    if token is not None:
        user_id = authenticator().token_user(token)
        if user_id is None:
            raise unauthorized(f"invalid or expired user token in {USER_TOKEN_HEADER}")
        return Caller(user_id=user_id)
    return Caller()


async def admin(key: str | None = Security(_api_key)) -> Caller:
    """Admin and write routes: items, tasks, lifecycle, improvement, user tokens."""
    if key is None:
        raise unauthorized(f"this route needs an API key in the {API_KEY_HEADER} header")
    return _key_caller(key)


def _key_caller(key: str) -> Caller:
    name = authenticator().key_name(key)
    if name is None:
        raise unauthorized(f"invalid API key in {API_KEY_HEADER}")
    return Caller(admin=True, key_name=name)


async def someone(who: Caller = Security(caller)) -> Caller:
    """Routes about one user's data: an API key or a user token is needed (which user: the route checks)."""
    if not (who.admin or who.user_id):
        raise unauthorized(f"this route needs a user token ({USER_TOKEN_HEADER}) or an API key ({API_KEY_HEADER})")
    return who


async def searcher(who: Caller = Security(caller)) -> Caller:
    """POST /v1/search: public unless auth.public_search is false."""
    if not (authenticator().settings.public_search or who.admin or who.user_id):
        raise unauthorized(f"search needs an API key ({API_KEY_HEADER}) or a user token ({USER_TOKEN_HEADER})")
    return who


async def clickstream_writer(who: Caller = Security(caller)) -> Caller:
    """Click events and irrelevant marks: public unless auth.public_clickstream is false (which sessions
    take them from whom: routes/sessions.py)."""
    if not (authenticator().settings.public_clickstream or who.admin or who.user_id):
        raise unauthorized(f"clickstream ingestion needs an API key ({API_KEY_HEADER}) or a user token "
                           f"({USER_TOKEN_HEADER})")
    return who


async def ingester(key: str | None = Security(_api_key)) -> Caller:
    """POST /v1/sessions, result lists shown by another system: es-ray cannot tell them from fabricated
    ones, so only a holder of an API key may record them (and is recorded with them)."""
    if key is None:
        raise unauthorized(f"recording a session shown by another system needs an API key in the "
                           f"{API_KEY_HEADER} header; sessions of es-ray's own searches are recorded by "
                           f"POST /v1/search")
    return _key_caller(key)


def require_user(who: Caller, user_id: str | None, what: str) -> None:
    """Raises unless the caller is an admin or the user `user_id` itself."""
    if who.may_act_as(user_id):
        return
    if not who.admin and who.user_id is None:
        raise unauthorized(f"{what} needs that user's token ({USER_TOKEN_HEADER}) or an API key ({API_KEY_HEADER})")
    raise forbidden(f"{what} belongs to another user")
