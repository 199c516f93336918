"""One accepted WebSocket on a provider route: frames relayed both ways as they arrive (text and binary,
never buffered), each client `response.create` admitted before it is forwarded, each response's end
metered as one event.

A refused `response.create` (model policy, key route, limits) is answered with an `error` frame in OpenAI's
format (`status` as Responses over WebSocket has it, the client's `event_id` as Realtime has it) and is not
forwarded; the socket stays usable. `response.completed`/`.incomplete`/`.failed` (Responses) and
`response.done` (Realtime) end a response: its usage is read by the route's adapter, priced, settled
against the reservation and recorded. Responses are matched to their `response.create` by lane
(`stream_id`, FIFO) and then by the provider's response id; responses the provider starts itself (Realtime
voice turns) are metered and counted too. An `error` before a response started answers its create (by the
client's `event_id` when the error names one). When either side closes, the other is closed, and
responses still running are recorded as cancelled and their reservations released.

Only a frame's `type` (and lane) is decoded on the way, with a typed decoder that skips the rest; whole
frames are decoded only at a response's start and end and for a client's `response.create`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from proxy import admission
from proxy.errors import BadRequest, NoRoute, TollwayError
from proxy.forward import Call, new_request_id
from proxy.providers.base import CallInfo, json_decode, json_encode

if TYPE_CHECKING:
    from proxy.auth import Identity
    from proxy.control import ProviderKey
    from proxy.events import Event
    from proxy.gateway import Gateway, ProviderRoute
    from proxy.upstream import UpstreamSocket

_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed", "response.done"})
_TEXT_DELTAS = frozenset({"response.output_text.delta", "response.text.delta",
                          "response.output_audio_transcript.delta", "response.audio_transcript.delta"})
_OUTCOMES = {"failed": "upstream_error", "cancelled": "cancelled"}  # by the response's status
_CLIENT_GONE_STATUS = 499


class _Kind(msgspec.Struct):
    type: str = ""
    stream_id: str | None = None  # the Responses WebSocket lane


class _Delta(msgspec.Struct):
    delta: str = ""


_read_kind = msgspec.json.Decoder(_Kind).decode
_read_delta = msgspec.json.Decoder(_Delta).decode
@dataclass(slots=True)
class _Response:
    """One response on the socket, from its `response.create` (or the provider's start) to its end."""

    call: Call
    lane: str | None  # `stream_id`: responses on one lane run in order
    client_event: str | None  # the client's `event_id` (Realtime errors name it)
    response_id: str | None = None  # the provider's id, known from `response.created`


class Session:
    """An accepted socket: relays frames, admits each `response.create`, meters each response's end."""

    def __init__(self, gw: Gateway, route: ProviderRoute, credential: str | None, identity: Identity,
                 key: ProviderKey, model_id: str | None, operation: str, template: Event) -> None:
        self.gw, self.route, self.key = gw, route, key
        self.credential, self.identity = credential, identity  # checked again at each response.create
        self.model_id, self.operation, self.template = model_id, operation, template
        self.pending: list[_Response] = []
        self.client_code: int | None = None
        self._lock = asyncio.Lock()  # one frame at a time towards the client

    async def run(self, receive, send, upstream: UpstreamSocket) -> None:
        tasks = (asyncio.create_task(self._from_client(receive, upstream, send)),
                 asyncio.create_task(self._from_upstream(upstream, send)))
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.client_code is not None:  # the client left (or the gateway is shutting down)
                await upstream.close(_sendable(self.client_code, 1001))
            else:
                await self._send(send, {"type": "websocket.close", "code": _sendable(upstream.close_code, 1011)})
                await upstream.close()
            await self._cancel_pending()

    async def _from_client(self, receive, upstream: UpstreamSocket, send) -> None:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                self.client_code = message.get("code", 1005)
                return
            text = message.get("text")
            if text is not None and '"response.create"' in text and not await self._admit(text, send):
                continue
            if not await upstream.send(text if text is not None else message.get("bytes") or b""):
                return

    async def _from_upstream(self, upstream: UpstreamSocket, send) -> None:
        while (data := await upstream.receive()) is not None:
            text = isinstance(data, str)
            if not await self._send(send, {"type": "websocket.send", "text" if text else "bytes": data}):
                return
            if text and ('"response.' in data or '"error"' in data):
                await self._observe(data)

    async def _send(self, send, message: dict) -> bool:
        async with self._lock:
            try:
                await send(message)
            except Exception:  # the client is gone (uvicorn raises its own disconnect error)
                return False
        return True

    # client → provider: admission of each response ------------------------------------------------------

    async def _admit(self, text: str, send) -> bool:
        """Whether to forward this frame: a `response.create` passes only when admitted."""
        try:
            payload = json_decode(text)
        except (msgspec.DecodeError, RecursionError):
            return True  # not ours to judge: the provider answers it
        if not isinstance(payload, dict) or payload.get("type") != "response.create":
            return True
        call = self._new_call(payload)
        try:
            await self._admit_response(call, payload)
        except TollwayError as err:
            call.event.status_code, call.event.outcome, call.recorded = err.status, err.outcome, err.recorded
            await self._send(send, {"type": "websocket.send", "text": _error_frame(self.route, err, payload)})
            await admission.finish(self.gw, self.route, call)
            return False
        self.pending.append(_Response(call, _str(payload.get("stream_id")), _str(payload.get("event_id"))))
        return True

    async def _admit_response(self, call: Call, payload: dict) -> None:
        gw, route, event = self.gw, self.route, call.event
        admission.check_store(gw)
        # A revoked or expired credential, and a policy reload, apply from the socket's next response on.
        identity, policies = await admission.identify(gw, route, self.credential, event)
        self.identity, call.policies = identity, policies
        admission.check_operation(policies, identity, event.endpoint)
        model_id = _str(payload.get("model")) or self.model_id
        if model_id is None:
            raise BadRequest("The response.create event needs a \"model\" string, e.g. \"model\": \"gpt-4o-mini\".")
        event.model = f"{route.name}/{model_id}"
        if self.key.key_id not in {k.key_id for k in admission.key_pool(gw, policies, route, identity, event.model)}:
            raise NoRoute(f"Model {event.model!r} is served by another provider key than this WebSocket's. "
                          f"Open a new WebSocket with ?model={model_id}, or call it over HTTP.")
        call.info = CallInfo(model_id, True, self.operation)
        call.reservation, call.limits = await admission.reserve(gw, policies, route, identity, event, call.info,
                                                                payload)

    def _new_call(self, body: dict | None) -> Call:
        event = replace(self.template, event_id=new_request_id(), ts=datetime.now(UTC), attempts=1)
        return Call(event, time.perf_counter(), body=body, policies=self.gw.policies)

    # provider → client: each response's start, text and end ----------------------------------------------

    async def _observe(self, text: str) -> None:
        try:
            frame = _read_kind(text)
        except msgspec.MsgspecError:
            return
        if frame.type in _TEXT_DELTAS:
            found = self._find(lambda r: r.lane == frame.stream_id and r.response_id is not None)
            if found is not None and found.call.estimate_output_chars is not None:
                found.call.estimate_output_chars += len(_read_delta(text).delta)
        elif frame.type == "response.created" or frame.type in _TERMINAL or frame.type == "error":
            payload = json_decode(text)
            if frame.type == "error":
                await self._failed(frame, payload)
            else:
                await self._response_event(frame, payload)

    async def _response_event(self, frame: _Kind, payload: dict) -> None:
        response = payload.get("response") if isinstance(payload.get("response"), dict) else {}
        rid = _str(response.get("id"))
        found = (self._find(lambda r: r.response_id is not None and r.response_id == rid)
                 or self._find(lambda r: r.lane == frame.stream_id and r.response_id is None))
        if found is None:  # started by the provider itself: metered and counted all the same
            found = await self._unreserved(response)
        if found.response_id is None:
            found.response_id, found.call.estimate_output_chars = rid, 0
            found.call.event.ttfb_ms = found.call.elapsed_ms()
        if frame.type not in _TERMINAL:
            return
        self.pending.remove(found)
        call = found.call
        call.usage, call.estimate_output_chars = self.route.adapter.read_body(response)
        call.event.status_code, call.event.outcome = 200, _OUTCOMES.get(response.get("status"), "ok")
        call.event.upstream_ms = call.elapsed_ms()
        await admission.finish(self.gw, self.route, call)

    async def _failed(self, frame: _Kind, payload: dict) -> None:
        """An error before a response started answers its `response.create`: recorded as the provider's refusal."""
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        client_event = _str(error.get("event_id"))
        found = self._find(lambda r: r.response_id is None and (
            r.client_event == client_event if client_event else r.lane == frame.stream_id))
        if found is None:
            return
        self.pending.remove(found)
        status = payload.get("status")
        found.call.event.status_code = status if isinstance(status, int) and 400 <= status < 600 else 400
        found.call.event.outcome = "upstream_error"
        await admission.finish(self.gw, self.route, found.call)

    async def _unreserved(self, response: dict) -> _Response:
        model_id = self.model_id or _str(response.get("model"))
        call = self._new_call(None)
        call.event.model = f"{self.route.name}/{model_id}" if model_id else None
        call.info = CallInfo(model_id, True, self.operation)
        call.reservation, call.limits = await admission.unreserved(self.gw, call.policies, self.identity, call.event)
        found = _Response(call, None, None)
        self.pending.append(found)
        return found

    def _find(self, match) -> _Response | None:
        return next((r for r in self.pending if match(r)), None)

    async def _cancel_pending(self) -> None:
        """The socket closed mid-response: each such response is cancelled and its reservation released
        (a response that had begun is metered on estimates, as a cut HTTP stream is)."""
        pending, self.pending = self.pending, []
        for found in pending:
            found.call.event.status_code, found.call.event.outcome = _CLIENT_GONE_STATUS, "cancelled"
            await admission.finish(self.gw, self.route, found.call)


def _error_frame(route: ProviderRoute, err: TollwayError, payload: dict) -> str:
    """A refusal as OpenAI's `error` event (Responses: `status`; Realtime: the client's `event_id`)."""
    body = json_decode(route.adapter.error_body(err))
    error = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), dict) else {"message": err.message}
    if _str(payload.get("event_id")):
        error["event_id"] = payload["event_id"]
    frame: dict[str, Any] = {"type": "error", "event_id": f"event_{new_request_id().hex}", "status": err.status,
                             "error": error}
    if err.retry_after is not None:
        frame["headers"] = {"retry-after": str(err.retry_after)}
    if _str(payload.get("stream_id")):
        frame["stream_id"] = payload["stream_id"]
    return json_encode(frame).decode()


def _sendable(code: int | None, default: int) -> int:
    """`code` if a close frame may carry it (1005, 1006 and 1015 are only ever reported), else `default`."""
    if code is not None and (code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return code
    return 1000 if code == 1005 else default


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
