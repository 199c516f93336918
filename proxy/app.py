"""`create_app`: wiring only.

Provider routes (`/{provider}/...`) go straight from the ASGI server to `proxy.forward`; Litestar
serves everything else (health, readiness, metrics, the unknown-provider 404) and the lifespan.
Skipping the framework's routing and middleware on the hot path measurably raised throughput.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import NotFoundException

from proxy import forward, websocket
from proxy.errors import UnknownProvider
from proxy.events import Event
from proxy.gateway import Gateway
from proxy.metrics import CONTENT_TYPE
from proxy.providers.registry import adapter_for
from proxy.token_exchange import exchange_response

for noisy in ("httpx", "apscheduler", "litestar"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def create_app(gateway: Gateway) -> GatewayApp:
    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/readyz")
    async def readyz() -> Response[dict[str, Any]]:
        recorder = gateway.recorder
        checks = {
            "policy": "ok" if gateway.policy_error is None else f"last edit refused: {gateway.policy_error}",
            "event_store": (recorder.last_error if recorder.last_error is not None else await gateway.events.check())
            if recorder else "not started",
            "limits": await gateway.limit_store.check(),  # a shared store (Redis) is pinged
            "control": gateway.control.health(),  # PostgreSQL's listener; "ok" on SQLite
        }
        # A refused policy edit leaves the previous policy serving: reported, but still ready. So does an
        # unreachable control store: tokens and keys are authenticated from the cached snapshot.
        ready = checks["event_store"] == "ok" and checks["limits"] == "ok"
        policies = gateway.policies
        # policy_hash: the set in force (a refused edit does not change it); `tollway status` compares it.
        # advice: settings that put limits at risk without stopping service (an evicting Redis); not a failed check
        return Response({"status": "ready" if ready else "not ready", "checks": checks, "policy_hash": policies.hash,
                         "advice": await gateway.advice() if checks["limits"] == "ok" else [],
                         "policy": {"version": policies.version, "hash": policies.hash,
                                    "loaded_at": policies.loaded_at.isoformat(), "warnings": len(policies.warnings)}},
                        status_code=200 if ready else 503)

    @get("/metrics")
    async def metrics() -> Response[bytes]:
        body = await gateway.render_metrics()
        return Response(body, media_type=CONTENT_TYPE)

    @post("/auth/token")
    async def auth_token(request: Request) -> Response[bytes]:
        """A JWT of a trusted issuer (Authorization: Bearer) for a short-lived Tollway token."""
        status, body = await exchange_response(gateway, request.headers)
        return Response(body, status_code=status, media_type="application/json",
                        headers={"cache-control": "no-store"})

    def not_found(request: Request, exc: NotFoundException) -> Response:
        """Unknown provider: answered (and recorded) in the OpenAI format, the most common client."""
        name = request.url.path.strip("/").split("/", 1)[0]
        known = ", ".join(sorted(gateway.routes))
        err = UnknownProvider(f"Unknown provider {name!r}. This gateway serves: {known}. "
                              "Use e.g. /openai/v1/chat/completions, or declare it in tollway.toml [providers].")
        event = Event(event_id=forward.new_request_id(), ts=datetime.now(UTC), status_code=404, outcome=err.outcome)
        if gateway.recorder and gateway.recorder.accepting:  # not billable: never worth growing a full buffer
            gateway.recorder.record(event)
        gateway.metrics.observe(event)
        return Response(adapter_for("openai").error_body(err), status_code=404, media_type="application/json",
                        headers={forward.REQUEST_ID_HEADER.decode(): str(event.event_id)})

    return GatewayApp(gateway, Litestar(
        route_handlers=[healthz, readyz, metrics, auth_token],
        on_startup=[gateway.start],
        on_shutdown=[gateway.stop],
        exception_handlers={NotFoundException: not_found},
        openapi_config=None,
        logging_config=None,
    ))


async def _base_url(scope: Any, send: Any) -> None:
    """`HEAD`/`GET /{provider}`: a client checking its base URL at start-up (Claude Code does). No call,
    no credential needed, no event."""
    allowed = scope["method"] in ("HEAD", "GET")
    body = b'{"gateway": "tollway"}' if allowed else b""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200 if allowed else 405,
                "headers": headers if allowed else [(b"allow", b"GET, HEAD"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": body if scope["method"] == "GET" else b""})


class GatewayApp:
    """The ASGI application: provider routes to the pipeline, the rest to Litestar."""

    def __init__(self, gateway: Gateway, admin: Litestar) -> None:
        self.gateway = gateway
        self.admin = admin
        self._routes = gateway.routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # provider routes only: any other path is refused there
            path = scope["path"]
            end = path.find("/", 1)
            await websocket.handle(self.gateway, self._routes.get(path[1:end] if end > 0 else path[1:]), scope,
                                   receive, send)
            return
        if scope["type"] == "http":
            path = scope["path"]
            end = path.find("/", 1)
            route = self._routes.get(path[1:end] if end > 0 else path[1:])
            if route is not None:
                if end < 0 or end == len(path) - 1:  # the provider's base URL itself
                    await _base_url(scope, send)
                else:
                    await forward.handle(self.gateway, route, scope, receive, send)
                return
        await self.admin(scope, receive, send)
