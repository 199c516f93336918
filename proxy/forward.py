"""The passthrough pipeline for one request on `/{provider}/{rest}`.

identify → decide → forward (strip client credentials, inject the routed key, stream through,
tap usage) → meter → record. Written as a plain ASGI callable so the bytes of a stream go
straight from the upstream socket to the client's, with no framework buffering in between.
Every request, refused ones included, ends as exactly one event.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import msgspec
from yarl import URL

from proxy import admission, object_calls, objects, relay
from proxy.errors import (
    BadRequest,
    BodyTimeout,
    BodyTooLarge,
    InternalError,
    TollwayError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.events import Event
from proxy.keys import preferring
from proxy.providers.base import Adapter, CallInfo, Usage, json_decode, json_encode
from proxy.providers.registry import CREDENTIAL_HEADERS, CREDENTIAL_QUERY_PARAMS
from proxy.request_body import parse_json_body
from proxy.uploads import ClientGone, UploadBody, boundary_of, form_field, read_head

if TYPE_CHECKING:
    from policy.loader import PolicySet
    from proxy.gateway import Gateway, ProviderRoute
    from proxy.limits import Reservation
    from proxy.objects import Owner
    from proxy.providers.objects import ObjectRules

log = logging.getLogger("tollway.gateway")
REQUEST_ID_HEADER = b"x-tollway-request-id"
#: Never forwarded upstream: hop-by-hop, routing and client-identity headers, and what aiohttp sets.
_DROP_REQUEST_HEADERS = CREDENTIAL_HEADERS | {
    "host", "content-length", "connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "forwarded", "x-real-ip",
    "accept-encoding", "cookie", "expect",
    # method-override and URL-rewrite headers: an upstream that honours them would run another call
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url",
}
#: Never passed back to the client: framing is redone here, uvicorn adds its own date/server.
_DROP_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server",
    "proxy-authenticate", "trailer", "upgrade",
})
_CLIENT_GONE_STATUS = 499  # as nginx logs it: the client closed the request
INTERNAL_ERROR = ("Tollway failed to handle this request (an internal error, logged with its x-tollway-request-id). "
                  "Retry; if it persists, give the request id to your Tollway operator.")


def new_request_id() -> uuid.UUID:
    """A random (version 4) UUID without a system call per request: request ids are not secrets."""
    return uuid.UUID(int=random.getrandbits(128), version=4)


class ClientDisconnected(Exception):
    """The client went away before its request body was read."""


@dataclass(slots=True)
class Call:
    """The state of one request as it moves through the pipeline."""

    event: Event
    started: float
    usage: Usage = field(default_factory=Usage)
    info: CallInfo | None = None
    body: dict | None = None
    response_started: bool = False
    client_gone: bool = False
    done: bool = False
    estimate_output_chars: int | None = None
    policies: PolicySet | None = None
    reservation: Reservation | None = None
    limits: list = field(default_factory=list)
    recorded: bool = True
    concluded: bool = False  # its event metered and recorded (`admission.conclude`)
    upstream_started: float | None = None  # when the attempt that answered began
    metered: bool = False  # usage and cost written onto the event (it happens once)
    draining: bool = False  # the client left; the provider's stream is read on for its usage
    raw: bytes = b""  # the request body as received (a JSON or empty one; uploads stream instead)
    objects: ObjectRules | None = None  # this wire format's object rules
    owner: Owner | None = None  # the owner of the object the call names, if it names one
    path_id: str | None = None  # the object (or model) id in the path
    origin: str = ""  # scheme://host as the client reached the gateway

    def elapsed_ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 3)


async def handle(gw: Gateway, route: ProviderRoute, scope: dict, receive, asgi_send) -> None:
    """ASGI entry for one provider route."""
    call = Call(Event(event_id=new_request_id(), ts=datetime.now(UTC), provider=route.name), time.perf_counter())

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            admission.conclude(gw, route, call)  # recorded before the client can have the whole answer
        await asgi_send(message)

    try:
        await _serve(gw, route, call, scope, receive, send)
    except TollwayError as err:
        call.event.outcome, call.recorded = err.outcome, err.recorded
        if not call.response_started:
            call.event.status_code = err.status
            await _send_error(call, route.adapter, err, send)
    except ClientDisconnected:
        call.event.outcome, call.event.status_code = "cancelled", _CLIENT_GONE_STATUS
    except asyncio.CancelledError:
        call.event.outcome, call.event.status_code = "cancelled", _CLIENT_GONE_STATUS
        if not call.client_gone:  # a server shutdown, not our own cancel: let it propagate
            raise
    except Exception:  # a failure nothing above foresaw: still a 500 in the route's format, and an event
        log.exception("request %s failed inside the gateway", call.event.event_id)
        call.event.outcome = "internal_error"
        if not call.response_started:
            call.event.status_code = InternalError.status
            await _send_error(call, route.adapter, InternalError(INTERNAL_ERROR), send)
    finally:
        call.done = True
        await admission.finish(gw, route, call)


async def _serve(gw: Gateway, route: ProviderRoute, call: Call, scope: dict, receive, send) -> None:
    admission.check_store(gw)
    adapter, event = route.adapter, call.event
    path = upstream_path(scope, route.name)
    operation, call.path_id = adapter.operations.resolve(scope["method"], path)
    event.endpoint = f"{route.name}/{operation}"
    headers = request_headers(scope["headers"])
    query = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
    call.origin = f"{scope['scheme']}://{headers.get('host', '')}"
    upload = await _read_request(gw, adapter, call, headers, receive)
    raw = b"" if upload is not None else call.raw
    call.objects = objects.rules_for(adapter.style)
    query_map = dict(query)
    session = query_map.get(call.objects.session_param) if call.objects.session_param else None

    credential = adapter.client_credential(headers, query_map) or headers.get("cf-access-jwt-assertion")
    keys = None if credential or session is None else await _continue_upload(gw, route, call, session)
    if keys is not None:
        info = call.info = CallInfo(None, False, operation, metered=False)
    else:
        identity, call.policies = await admission.identify(gw, route, credential, event)
        admission.check_operation(call.policies, identity, event.endpoint)
        call.body = parse_json_body(raw) if upload is None else None
        is_models, model_id = adapter.model_path(scope["method"], path)
        if is_models and model_id is None:
            await _serve_model_list(gw, route, call, identity, path, headers, query, send)
            return
        call.owner = await objects.check_access(gw.objects, call.policies, route.name, call.objects, identity,
                                                operation, call.path_id, call.body, session)
        info = call.info = _inspect(adapter, scope["method"], path, operation, call.body, raw, upload, is_models,
                                    model_id, headers)
        keys = await _admit(gw, route, call, identity, info)

    url = upstream_url(route.base_url, path, [(k, v) for k, v in query if k not in CREDENTIAL_QUERY_PARAMS])
    metering = gw.settings.metering
    drain_s = metering.drain_timeout_s if metering.on_client_disconnect == "drain" else None
    watch = functools.partial(_watch_for_disconnect, call, receive, drain_s)
    if upload is None:
        watch()
        body = info.body if info.body is not None else raw
    else:  # the body is still arriving: watch for the client leaving once it has all been read
        upload.on_end = watch
        body, keys = upload, keys[:1]  # a streamed body cannot be sent twice: no failover
    await _forward_with_failover(gw, route, call, keys, scope["method"], url, headers, body,
                                 send if drain_s is None else _unless_draining(call, send))
    if call.draining:  # the provider's response was read to its end for its usage; the client had left
        event.outcome, event.status_code = "cancelled", _CLIENT_GONE_STATUS


async def _admit(gw: Gateway, route: ProviderRoute, call: Call, identity, info: CallInfo) -> list:
    """The keys to try, after the model's policy (for a call that names one), with the limits reserved."""
    event, policies = call.event, call.policies
    if info.model is not None:
        event.model, event.streamed = f"{route.name}/{info.model}", info.stream
        keys = preferring(admission.key_pool(gw, policies, route, identity, event.model), _owner_key(call))
    else:  # files, batches, stored objects: governed by operations.csv (and ownership) alone
        keys = gw.keys.provider_pool(policies, identity.tenant, route.name, _owner_key(call))
    call.reservation, call.limits = await admission.reserve(gw, policies, route, identity, event, info, call.body)
    return keys


async def _continue_upload(gw: Gateway, route: ProviderRoute, call: Call, session: str) -> list | None:
    """The bytes of a resumable upload, sent to the URL the gateway handed out when the upload started, with
    no credential (as the provider accepts them: the URL, unguessable, is the capability). Admitted as the
    tenant and user that started it, with its key; None when the session is not one the gateway started."""
    owner = await gw.objects.owner(route.name, session)
    if owner is None or owner.kind != objects.UPLOAD_SESSION:
        return None
    call.owner, call.policies = owner, gw.policies
    event = call.event
    event.tenant, event.user_pseudonym, event.auth_method = owner.tenant, owner.user_pseudonym, "upload_url"
    return gw.keys.provider_pool(call.policies, owner.tenant, route.name, owner.key_id)


def _inspect(adapter: Adapter, method: str, path: str, operation: str, body: dict | None, raw: bytes,
             upload: UploadBody | None, is_models: bool, model_id: str | None, headers: dict[str, str]) -> CallInfo:
    """What the request is: a model call (model, stream flag, upstream body) or, with no model, an object call."""
    if is_models:
        return CallInfo(model_id, False, "models", metered=False)
    if operation not in adapter.model_operations:  # a model is optional here (moderations, cached contents)
        model = body.get("model") if isinstance(body, dict) else None
        model = model.strip().removeprefix("models/") if isinstance(model, str) else None
        return CallInfo(model or None, False, operation, metered=False)
    if upload is None:
        return adapter.inspect(method, path, body, raw)
    boundary = boundary_of(headers.get("content-type", ""))
    model = form_field(upload.head, boundary, "model") if boundary else None
    if model is None:
        raise BadRequest(f"{operation} needs a \"model\" form field, sent before the file "
                         "(the official SDKs do), e.g. model=whisper-1.")
    return CallInfo(model, False, operation)


def _owner_key(call: Call) -> str | None:
    return call.owner.key_id if call.owner is not None else None


async def _read_request(gw: Gateway, route_adapter: Adapter, call: Call, headers: dict[str, str], receive
                        ) -> UploadBody | None:
    """A JSON (or empty) body read whole into `call.raw`; any other body left streaming (an `UploadBody`)."""
    server = gw.settings.server
    declared = headers.get("content-length", "")
    if not route_adapter.streams_body(headers):
        if declared.isdigit() and int(declared) > server.max_body_bytes:
            raise BodyTooLarge(_too_large_message(gw))
        call.raw = await read_body(receive, server.max_body_bytes, server.body_timeout_s, gw)
        return None
    too_large = (f"The upload is larger than this gateway accepts ({server.max_upload_bytes} bytes). Send less, "
                 "or ask the operator to raise [server] max_upload_bytes.")
    if declared.isdigit() and int(declared) > server.max_upload_bytes:
        raise BodyTooLarge(too_large)
    try:
        head, more = await read_head(receive, server.max_upload_bytes, server.body_timeout_s, too_large)
    except ClientGone as exc:
        raise ClientDisconnected from exc
    return UploadBody(receive, head, more, len(head), server.max_upload_bytes, server.body_timeout_s,
                      lambda: None, too_large)


async def _forward_with_failover(gw: Gateway, route: ProviderRoute, call: Call, keys: list, method: str,
                                 url: URL, headers: dict[str, str], body: bytes, send) -> None:
    """Try the pool's keys in order. A key is never retried after a byte reached the client."""
    event, adapter = call.event, route.adapter
    backoff = gw.settings.limits.retry_backoff_ms / 1000
    for attempt, key in enumerate(keys, start=1):
        event.key_id, event.billing_mode, event.attempts = key.key_id, _billing_mode(key), attempt
        last = attempt == len(keys)
        call.upstream_started = time.perf_counter()
        try:
            async with gw.upstream.request(route.settings, method, url, _upstream_headers(headers, adapter, key, body),
                                           body) as response:
                status = response.status
                gw.keys.answered(key, status, response.header("retry-after") if status == 429 else None)
                if not last and (status in (401, 429) or status >= 500):  # a 403 is about the request
                    await asyncio.sleep(backoff * 2 ** (attempt - 1))
                    continue
                event.status_code = status
                event.outcome = "ok" if status < 400 else "upstream_error"
                response_headers = _response_headers(response.raw_headers, event.event_id, key)
                if call.objects is not None and call.objects.url_headers:
                    for url in object_calls.point_at_gateway(response_headers, call.objects.url_headers, route, call.origin):
                        object_calls.record_session(gw, route, call, url)
                if status == 200 and object_calls.reads_results(call):
                    await relay.relay_results(gw, route, call, response, response_headers, send)
                elif response.content_type == "text/event-stream":
                    await relay.relay_stream(gw, route, call, response, response_headers, send,
                                        gw.settings.server.max_sse_event_bytes)
                elif _is_json(response.content_type):
                    await relay.relay_body(gw, call, route, response, response_headers, send,
                                      gw.settings.server.max_response_bytes)
                else:  # files, audio, HTML error pages: nothing to meter, so nothing to hold
                    await relay.relay_raw(call, response, response_headers, send)
                return
        except (UpstreamUnreachable, UpstreamTimeout) as err:
            if isinstance(body, UploadBody) and body.error is not None:  # the client's side failed, not the provider
                raise (ClientDisconnected() if isinstance(body.error, ClientGone) else body.error) from err
            gw.keys.failed(key, err.outcome)
            if last or call.response_started:
                raise
            await asyncio.sleep(backoff * 2 ** (attempt - 1))


def _billing_mode(key) -> str:
    return "byok" if key.owner_tenant else "unified"


async def _serve_model_list(gw: Gateway, route: ProviderRoute, call: Call, identity, path: str,
                            headers: dict[str, str], query: list[tuple[str, str]], send) -> None:
    """`GET …/models`: the provider's list (or the priced models) filtered to what the caller may use."""
    event, adapter, policy = call.event, route.adapter, call.policies.policy

    def allowed(model_id: str) -> bool:
        return policy.decide(identity.tenant, identity.subjects, f"{route.name}/{model_id}").allowed

    key = gw.keys.listing_key(call.policies, identity.tenant, route.name)
    if key is None:
        priced = call.policies.prices.models(route.name, route.book_provider)
        await _send_json(call, 200, adapter.model_list_body(route.name, [m for m in priced if allowed(m)]), send)
        return
    event.key_id, event.billing_mode, event.attempts = key.key_id, _billing_mode(key), 1
    url = upstream_url(route.base_url, path, [(k, v) for k, v in query if k not in CREDENTIAL_QUERY_PARAMS])
    async with gw.upstream.request(route.settings, "GET", url, _upstream_headers(headers, adapter, key),
                                   None) as response:
        body = await response.read(gw.settings.server.max_response_bytes)
        event.status_code, event.outcome = response.status, "ok" if response.status < 400 else "upstream_error"
        try:
            payload = json_decode(body) if response.status == 200 else None
        except msgspec.DecodeError:
            payload = None
        if payload is None:
            headers_out = _response_headers(response.raw_headers, event.event_id, key)
            headers_out.append((b"content-length", str(len(body)).encode()))
            call.response_started = True
            await send({"type": "http.response.start", "status": response.status, "headers": headers_out})
            await send({"type": "http.response.body", "body": body})
            return
    await _send_json(call, 200, adapter.filter_model_list(payload, allowed), send)


async def _send_json(call: Call, status: int, payload: Any, send) -> None:
    body = json_encode(payload)
    call.event.status_code = status
    call.response_started = True
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (REQUEST_ID_HEADER, str(call.event.event_id).encode())]})
    call.event.ttfb_ms = call.elapsed_ms()
    await send({"type": "http.response.body", "body": body})


def _upstream_headers(headers: dict[str, str], adapter: Adapter, key, body: Any = None) -> list[tuple[str, str]]:
    """The client's headers minus credentials, hop-by-hop and routing headers (including any the
    client names in `Connection`, RFC 9110 7.6.1), plus the routed key. A streamed upload keeps the
    length its client declared (the provider may need it; the body is not re-counted here)."""
    named = {n.strip().lower() for n in headers["connection"].split(",")} if "connection" in headers else ()
    out = [(k, v) for k, v in headers.items()
           if k not in _DROP_REQUEST_HEADERS and not k.startswith("x-forwarded-") and k not in named]
    if isinstance(body, UploadBody) and headers.get("content-length", "").isdigit():
        out.append(("content-length", headers["content-length"]))
    return out + adapter.key_headers(key.secret)


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def _send_error(call: Call, adapter: Adapter, err: TollwayError, send) -> None:
    headers = [(b"content-type", b"application/json"), (REQUEST_ID_HEADER, str(call.event.event_id).encode())]
    if err.retry_after is not None:
        headers.append((b"retry-after", str(err.retry_after).encode()))
    call.response_started = True
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": adapter.error_body(err)})


def _watch_for_disconnect(call: Call, receive, drain_s: float | None) -> None:
    """When the client goes away before the request is done: cancel it, or (`drain_s` set) let it read
    the provider's response on for at most `drain_s` seconds, so that the event gets the provider's usage."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    timers = []

    async def watch() -> None:
        message = await receive()
        if message["type"] == "http.disconnect" and not call.done:
            call.client_gone = True
            if drain_s is None:
                task.cancel()
            else:
                call.draining = True
                timers.append(loop.call_later(drain_s, task.cancel))

    watcher = loop.create_task(watch())
    task.add_done_callback(lambda _: [watcher.cancel(), *(t.cancel() for t in timers)])


def _unless_draining(call: Call, send):
    """`send`, except that nothing more goes to a client that has left."""
    async def guarded(message: dict) -> None:
        if not call.draining:
            await send(message)
    return guarded


async def read_body(receive, limit: int, timeout_s: float, gw: Gateway) -> bytes:
    """The whole request body, refused when larger than `limit` (413) or slower than `timeout_s` (408)."""
    try:
        return await _read_body(receive, limit, timeout_s, gw)
    except TimeoutError as exc:
        raise BodyTimeout(f"The request body did not arrive within {timeout_s:g} s; send it at once "
                          "(the gateway's [server] body_timeout_s).") from exc


async def _read_body(receive, limit: int, timeout_s: float, gw: Gateway) -> bytes:
    chunks, size = [], 0
    async with asyncio.timeout(timeout_s):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(_too_large_message(gw))
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def request_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names lower-cased, repeated headers joined with ", " (RFC 9110 5.3); values decoded as
    UTF-8 so that they are forwarded byte for byte (the upstream client encodes them as UTF-8). A value
    that is not UTF-8 is refused, except in a credential header, where it is simply a wrong credential."""
    headers: dict[str, str] = {}
    for key, value in raw:
        name = key.decode("latin-1").lower()
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            if name not in CREDENTIAL_HEADERS:
                raise BadRequest(f"The value of header {name!r} is not valid UTF-8; send header values as "
                                 "ASCII (or UTF-8).") from exc
            text = value.decode("latin-1")
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return headers


def upstream_path(scope: dict, provider: str) -> str:
    """The `{rest}` of `/{provider}/{rest}`, still percent-encoded, refused if it could escape."""
    raw = scope.get("raw_path") or scope["path"].encode()
    rest = raw.split(b"?", 1)[0][len(provider) + 1:].decode("latin-1")
    lowered = rest.lower()
    if not rest.startswith("/") or rest.startswith("//") or "%2f" in lowered or "%5c" in lowered or "\\" in rest:
        raise BadRequest("The path after the provider name is not a plain API path.")
    segments = lowered.replace("%2e", ".").split("/")
    if any(s in (".", "..") for s in segments):
        raise BadRequest("The path may not contain '.' or '..' segments.")
    return rest


def upstream_url(base_url: URL, path: str, query: list[tuple[str, str]]) -> URL:
    """`base_url` + `path` (+ query); the host is always the configured one."""
    url = URL(str(base_url).rstrip("/") + path + ("?" + urlencode(query) if query else ""), encoded=True)
    if (url.scheme, url.host, url.port) != (base_url.scheme, base_url.host, base_url.port):
        raise BadRequest("The path would leave the configured provider host.")
    return url


def _response_headers(raw_headers: Any, event_id: uuid.UUID, key) -> list[tuple[bytes, bytes]]:
    """The provider's response headers minus framing ones, and minus any that echo the injected key
    (a provider, or a proxy before it, that reflects request headers must not hand the key out)."""
    secret = key.secret.reveal().encode()
    headers = [(k.lower(), v) for k, v in raw_headers
               if k.lower().decode("latin-1") not in _DROP_RESPONSE_HEADERS and secret not in v]
    headers.append((REQUEST_ID_HEADER, str(event_id).encode()))
    return headers


def _too_large_message(gw: Gateway) -> str:
    return (f"The request body is larger than this gateway accepts ({gw.settings.server.max_body_bytes} bytes). "
            "Send less, or ask the operator to raise [server] max_body_bytes.")
