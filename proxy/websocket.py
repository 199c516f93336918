"""WebSocket passthrough on provider routes: OpenAI's Responses over WebSocket and Realtime API.

Handshake: identify (`Authorization: Bearer`, `Cf-Access-Jwt-Assertion`, or a browser's
`openai-insecure-api-key.<token>` subprotocol) → operations.csv → the key (the route of the handshake's
`?model=`, else the tenant's first route for the provider) → the provider's handshake with that key
injected and the client's credentials stripped → accept, with the subprotocol the provider chose. A refusal
is an HTTP answer in the provider's error format where the server supports denial responses (else a close
1008) and one event.

The accepted socket is a `websocket_session.Session`: relay, per-response admission and metering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from proxy import admission
from proxy.errors import (
    BadRequest,
    InternalError,
    NoRoute,
    TollwayError,
    UnknownProvider,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.events import Event
from proxy.forward import (
    REQUEST_ID_HEADER,
    Call,
    new_request_id,
    request_headers,
    upstream_path,
    upstream_url,
)
from proxy.providers.operations import OTHER
from proxy.providers.registry import CREDENTIAL_HEADERS, CREDENTIAL_QUERY_PARAMS
from proxy.websocket_session import Session

if TYPE_CHECKING:
    from proxy.control import ProviderKey
    from proxy.gateway import Gateway, ProviderRoute
    from proxy.upstream import UpstreamSocket

log = logging.getLogger("tollway.gateway")
_KEY_PROTOCOL = "openai-insecure-api-key."  # a browser's only way to send a credential on a WebSocket
_DROP_HEADERS = CREDENTIAL_HEADERS | {
    "host", "connection", "upgrade", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "origin", "cookie", "content-length", "transfer-encoding", "keep-alive", "te",
    "trailer", "proxy-authorization", "forwarded", "x-real-ip", "accept-encoding",
}
_DROP_ACCEPT_HEADERS = frozenset({
    "connection", "upgrade", "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions",
    "content-length", "transfer-encoding", "date", "server", "set-cookie",
})

async def handle(gw: Gateway, route: ProviderRoute | None, scope: dict, receive, send) -> None:
    """ASGI entry for a `websocket` scope; `route` None: the path names no provider."""
    if (await receive())["type"] != "websocket.connect":
        return
    call = Call(Event(event_id=new_request_id(), ts=datetime.now(UTC), provider=route.name if route else None,
                      streamed=True), time.perf_counter())
    try:
        session, upstream = await _open(gw, route, call, scope)
    except Exception as exc:  # every refusal, and any failure, still answers and records the handshake
        err = exc if isinstance(exc, TollwayError) else InternalError(f"Tollway failed to open this WebSocket "
                                                                      f"(request {call.event.event_id}).")
        if not isinstance(exc, TollwayError):
            log.exception("WebSocket %s failed inside the gateway", call.event.event_id)
        call.event.status_code, call.event.outcome, call.recorded = err.status, err.outcome, err.recorded
        await _deny(scope, send, route, call.event, err)
        await admission.finish(gw, route, call)
        return
    await send({"type": "websocket.accept", "subprotocol": upstream.protocol
                if upstream.protocol in (scope.get("subprotocols") or ()) else None,
                "headers": _accept_headers(upstream, session.key, call.event.event_id)})
    await session.run(receive, send, upstream)


async def _open(gw: Gateway, route: ProviderRoute | None, call: Call, scope: dict) -> tuple[Session, UpstreamSocket]:
    if route is None:
        raise UnknownProvider(f"Unknown provider in {scope['path']!r}: WebSockets are relayed on provider routes, "
                              f"e.g. /openai/v1/realtime. This gateway serves: {', '.join(sorted(gw.routes))}.")
    if route.adapter.style != "openai":  # only OpenAI's frames are understood, hence metered
        raise BadRequest("Tollway relays WebSockets on OpenAI-style routes only (Responses over WebSocket, Realtime).")
    admission.check_store(gw)
    event, adapter = call.event, route.adapter
    path = upstream_path(scope, route.name)
    operation = adapter.operations.name("GET", path)
    if operation == OTHER:  # a WebSocket on a path that only POSTs: Responses over WebSocket creates responses
        operation = adapter.operations.name("POST", path)
    event.endpoint = f"{route.name}/{operation}"
    headers = request_headers(scope["headers"])
    query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    offered = tuple(scope.get("subprotocols") or ())
    credential = (adapter.client_credential(headers, dict(query)) or headers.get("cf-access-jwt-assertion")
                  or next((p[len(_KEY_PROTOCOL):] for p in offered if p.startswith(_KEY_PROTOCOL)), None))
    identity, policies = await admission.identify(gw, route, credential, event)
    admission.check_operation(policies, identity, event.endpoint)
    model_id = dict(query).get("model") or None
    if model_id:
        event.model = f"{route.name}/{model_id}"
        keys = admission.key_pool(gw, policies, route, identity, event.model)
    else:  # the model comes with each response.create: the key of the tenant's route for this provider
        key = gw.keys.listing_key(policies, identity.tenant, route.name)
        if key is None:
            raise NoRoute(f"No key route for tenant {identity.tenant!r} serves provider {route.name!r}. "
                          "Ask your governance lead to add one to policy/routes.csv.")
        keys = [key]
    url = upstream_url(route.base_url, path, [(k, v) for k, v in query if k not in CREDENTIAL_QUERY_PARAMS])
    protocols = tuple(p for p in offered if not p.startswith(_KEY_PROTOCOL))
    upstream, key = await _connect(gw, route, event, keys, url, _upstream_headers(headers), protocols)
    return Session(gw, route, credential, identity, key, model_id, operation, event), upstream


async def _connect(gw: Gateway, route: ProviderRoute, event: Event, keys: list[ProviderKey], url, headers: list,
                   protocols: tuple[str, ...]) -> tuple[UpstreamSocket, ProviderKey]:
    """The provider's handshake, trying the pool's keys in order as HTTP calls do."""
    backoff = gw.settings.limits.retry_backoff_ms / 1000
    for attempt, key in enumerate(keys, start=1):
        event.key_id, event.billing_mode, event.attempts = key.key_id, _billing_mode(key), attempt
        last = attempt == len(keys)
        try:
            upstream = await gw.upstream.websocket(route.settings, url, headers + route.adapter.key_headers(key.secret),
                                                   protocols)
        except UpstreamRefused as err:
            gw.keys.answered(key, err.status, None if err.retry_after is None else str(err.retry_after))
            if last or not (err.status in (401, 429) or err.status >= 500):
                raise
        except (UpstreamUnreachable, UpstreamTimeout) as err:
            gw.keys.failed(key, err.outcome)
            if last:
                raise
        else:
            gw.keys.answered(key, 101, None)
            return upstream, key
        await asyncio.sleep(backoff * 2 ** (attempt - 1))
    raise AssertionError("unreachable: the last key raises")


async def _deny(scope: dict, send, route: ProviderRoute | None, event: Event, err: TollwayError) -> None:
    """Refuse the handshake: an HTTP answer where the server can send one, otherwise a close with a reason."""
    if route is not None and "websocket.http.response" in (scope.get("extensions") or {}):
        headers = [(b"content-type", b"application/json"), (REQUEST_ID_HEADER, str(event.event_id).encode())]
        if err.retry_after is not None:
            headers.append((b"retry-after", str(err.retry_after).encode()))
        await send({"type": "websocket.http.response.start", "status": err.status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": route.adapter.error_body(err)})
        return
    reason = err.message.encode()[:123].decode(errors="ignore")  # a close reason holds 123 bytes
    await send({"type": "websocket.close", "code": 1011 if err.status >= 500 else 1008, "reason": reason})


def _upstream_headers(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The client's handshake headers minus credentials, WebSocket framing and hop-by-hop ones."""
    named = {n.strip().lower() for n in headers["connection"].split(",")} if "connection" in headers else ()
    return [(k, v) for k, v in headers.items()
            if k not in _DROP_HEADERS and not k.startswith("x-forwarded-") and k not in named]


def _accept_headers(upstream: UpstreamSocket, key: ProviderKey, event_id) -> list[tuple[bytes, bytes]]:
    """The provider's handshake headers (model, rate-limit, ...), minus framing and any that echo the key."""
    secret = key.secret.reveal().encode()
    headers = [(k.lower(), v) for k, v in upstream.raw_headers
               if k.lower().decode("latin-1") not in _DROP_ACCEPT_HEADERS and secret not in v]
    return [*headers, (REQUEST_ID_HEADER, str(event_id).encode())]


def _billing_mode(key: ProviderKey) -> str:
    return "byok" if key.owner_tenant else "unified"
