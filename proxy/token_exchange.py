"""`POST /auth/token`: a JWT of a trusted issuer, exchanged for a short-lived Tollway token.

    POST /auth/token            Authorization: Bearer <JWT>
    200 {"token": "tw_...", "expires_at": "2026-11-20T13:00:00Z", "tenant": ..., "user": ..., "roles": [...],
         "identity_source": "github"}

The JWT is verified and mapped exactly as on a provider route (`proxy.identity_map`). The token is
bound to that tenant, user and roles, lives `[auth] exchange_ttl`, and is stored hashed in
control.db with an audit entry (issuer, user pseudonym, expiry; never the token). The write goes
through the gateway's control-db writer thread and is awaited, so the event loop never blocks on
SQLite and the token works from the very next request. Refusals are JSON `{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from proxy.control import RETRYABLE, ControlStore, utcnow
from proxy.errors import BadRequest, StoreUnavailable, TollwayError, Unauthenticated, UnknownTenant
from proxy.identity_map import map_identity
from proxy.jwt_auth import looks_like_jwt
from proxy.providers.registry import adapter_for

if TYPE_CHECKING:
    from proxy.control_writer import ControlWriter
    from proxy.gateway import Gateway

log = logging.getLogger("tollway.exchange")
COMMIT_TIMEOUT_S = 15.0
_HINT = "Send a JWT of a trusted issuer as `Authorization: Bearer <JWT>`."


async def exchange_response(gw: Gateway, headers: Mapping[str, str]) -> tuple[int, bytes]:
    """(status, JSON body) for a POST /auth/token with these request headers."""
    try:
        return 200, _json(await exchange(gw, _credential(headers)))
    except TollwayError as err:
        return err.status, adapter_for("openai").error_body(err)


async def exchange(gw: Gateway, credential: str | None) -> dict[str, Any]:
    """Verify and map the JWT, issue the token, wait for its commit; the answer's document."""
    if gw.jwt is None:
        raise BadRequest("Token exchange is off: this gateway trusts no JWT issuer. Ask your Tollway operator to "
                         "add one to tollway.toml ([[auth.issuers]]).")
    if not credential:
        raise Unauthenticated(f"No credential sent. {_HINT}")
    if not looks_like_jwt(credential):
        raise Unauthenticated(f"Only a JWT can be exchanged, not a Tollway token or another key. {_HINT}")
    entry, claims = await gw.jwt.verify(credential)
    identity, _ = map_identity(entry, claims, gw.policies.files.identities, "exchanged")
    if identity.tenant not in gw.policies.files.tenants:
        raise UnknownTenant(f"The JWT maps to tenant {identity.tenant!r}, which is not a tenant of this gateway. "
                            "Ask your Tollway operator to add it to tenants.csv.")
    expires_at = utcnow() + gw.settings.auth.exchange_ttl
    pseudonym = str(gw.pseudonymize(identity.tenant, identity.user))
    token, secret = await committed(gw.control_writer, lambda store: store.exchange_token(
        identity.tenant, identity.user, list(identity.roles), expires_at, entry.name, pseudonym))
    gw.control.remember(token, secret)  # on PostgreSQL the notified reload follows a few ms later
    log.info("token %s exchanged for a JWT of issuer %s (tenant %s, expires %s)", token.token_id, entry.name,
             identity.tenant, token.expires_at)
    return {"token": secret, "expires_at": token.expires_at, "id": token.token_id, "tenant": token.tenant,
            "user": token.user_id, "roles": list(token.roles), "identity_source": token.identity_source}


async def committed(writer: ControlWriter | None, job: Callable[[ControlStore], Any]) -> Any:
    """Run `job` on the control-db writer thread and wait until it has committed (503 if it cannot soon)."""
    if writer is None:
        raise StoreUnavailable("The gateway is starting or stopping; try again in a moment.")
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run(store: ControlStore) -> None:
        if done.cancelled():
            return  # the request gave up waiting: issue nothing
        try:
            result = job(store)
        except RETRYABLE:
            raise  # locked or unreachable: the writer retries the whole job (its transaction was rolled back)
        except Exception as exc:  # handed to the waiting request
            _settle(done.set_exception, exc)
        else:
            _settle(done.set_result, result)

    writer.submit("token exchange", run)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(done), COMMIT_TIMEOUT_S)
    except TimeoutError as exc:
        raise StoreUnavailable("control.db is busy; the token was not issued. Try again shortly.") from exc


def _settle(setter: Callable[[Any], None], value: Any) -> None:
    """Hand the outcome over, unless the request stopped waiting meanwhile (its token then expires unused)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        setter(value)


def _credential(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("cf-access-jwt-assertion") or None


def _json(document: dict) -> bytes:
    return json.dumps(document).encode()
