"""WebSocket endpoints of the simulated OpenAI provider: Responses over WebSocket and Realtime.

* ``GET /openai/v1/responses`` (upgraded): each ``{"type": "response.create", "model": ..., "input": ...}``
  streams the events ``POST /v1/responses`` streams (``response.created``, ``response.output_text.delta``,
  ..., ``response.completed`` or ``response.incomplete`` with usage), one per text frame, the request's
  ``stream_id`` echoed.
* ``GET /openai/v1/realtime?model=M`` (subprotocol ``realtime`` when offered): ``session.created`` on
  connect; ``session.update`` → ``session.updated``; ``conversation.item.create`` adds to the conversation
  (``conversation.item.added`` / ``.done``); ``response.create`` streams ``response.created`` …
  ``response.output_text.delta`` … ``response.done`` with usage in Realtime's shape. Input tokens count
  the conversation's items (or the response's own ``input``); replies are not added to it.

Both check the key as the HTTP endpoints do (401 before the upgrade), are recorded as a ``SimRequest``
(method ``GET``), and take the ``x-sim-*`` controls from the handshake's headers (``x-sim-fault:
status:CODE`` answers every ``response.create`` with an ``error`` event of that status). Test hooks: a
client frame ``{"type": "sim.close", "code": N}`` makes the provider close the socket with code N; the
handshake header ``x-sim-echo-key: 1`` echoes the presented key in a response header (a leaky provider).
``app[WS_STATE_KEY]`` counts sockets opened, the close codes of those that ended and the client events' types.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from proxy.simulator import (
    PROVIDERS,
    STATE_KEY,
    SimRequest,
    _BadRequest,
    _Call,
    _Controls,
    _dumps,
    _error,
    _Usage,
)

_OPENAI = PROVIDERS[0]
_MAX_MESSAGE = 16 * 1024 * 1024


@dataclass
class WsState:
    opened: int = 0
    closed: list[int | None] = field(default_factory=list)  # the close code of each ended socket
    received: list[str] = field(default_factory=list)  # the type of each client event, in order


WS_STATE_KEY = web.AppKey("tollway_simulator_ws", WsState)


def add_websocket_routes(app: web.Application) -> None:
    """Register the endpoints (before the provider's catch-all route)."""
    app[WS_STATE_KEY] = WsState()
    app.router.add_get(_OPENAI.prefix + "/v1/responses", _responses)
    app.router.add_get(_OPENAI.prefix + "/v1/realtime", _realtime)


async def _handshake(request: web.Request, protocols: tuple[str, ...],
                     problem: str | None = None) -> web.WebSocketResponse | web.Response:
    state = request.app[STATE_KEY]
    if state.record:
        headers = {k.lower(): v for k, v in request.headers.items()}
        state.add(SimRequest("openai", "GET", request.path[len(_OPENAI.prefix):], request.query_string, headers, None))
    expected, presented = state.keys.get("openai"), _OPENAI.credential(request)
    if expected is not None and presented != expected:
        return _error(_OPENAI, 401, "Invalid API key provided." if presented else "No API key provided.")
    if request.headers.get("upgrade", "").lower() != "websocket":
        return _error(_OPENAI, 400, "This endpoint speaks WebSocket: connect with an Upgrade.")
    if problem:
        return _error(_OPENAI, 400, problem)
    ws = web.WebSocketResponse(protocols=protocols, max_msg_size=_MAX_MESSAGE)
    if request.headers.get("x-sim-echo-key") and presented:
        ws.headers["x-sim-echo-key"] = presented
    await ws.prepare(request)
    request.app[WS_STATE_KEY].opened += 1
    return ws


async def _events(ws: web.WebSocketResponse, ws_state: WsState):
    """The client's JSON events until it closes (or asks the provider to close, `sim.close`)."""
    async for message in ws:
        if message.type is not WSMsgType.TEXT:
            continue
        try:
            event = json.loads(message.data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            await _send_error(ws, 400, "The event is not a JSON object.", {})
            continue
        ws_state.received.append(str(event.get("type")))
        if event.get("type") == "sim.close":
            await ws.close(code=event.get("code", 1000))
        else:
            yield event


async def _serve(request: web.Request, ws: web.WebSocketResponse, handle) -> web.WebSocketResponse:
    """Read the client's events while `handle` answers them in order: a reply being streamed never keeps
    the socket from noticing that the client closed (the reply then stops)."""
    queue: asyncio.Queue[dict] = asyncio.Queue()

    async def work() -> None:
        while True:
            try:
                await handle(await queue.get())
            except (ConnectionError, RuntimeError):  # the client went away mid-reply
                return

    worker = asyncio.create_task(work())
    try:
        async for event in _events(ws, request.app[WS_STATE_KEY]):
            queue.put_nowait(event)
    finally:  # also when aiohttp cancels the handler of a connection that is gone
        request.app[WS_STATE_KEY].closed.append(ws.close_code)
        worker.cancel()
    return ws


async def _send(ws: web.WebSocketResponse, payload: dict) -> None:
    await ws.send_str(_dumps(payload).decode())


async def _send_error(ws: web.WebSocketResponse, status: int, message: str, event: dict) -> None:
    error = _OPENAI.error_body(status, message)["error"]
    if isinstance(event.get("event_id"), str):
        error["event_id"] = event["event_id"]
    frame = {"type": "error", "status": status, "error": error}
    if isinstance(event.get("stream_id"), str):
        frame["stream_id"] = event["stream_id"]
    await _send(ws, frame)


# Responses over WebSocket ------------------------------------------------------------------------------


async def _responses(request: web.Request) -> web.StreamResponse:
    ws = await _handshake(request, ())
    if not isinstance(ws, web.WebSocketResponse):
        return ws
    ctl = _Controls.parse(request.headers)

    async def handle(event: dict) -> None:
        if ctl.fault_status:
            await _send_error(ws, ctl.fault_status, f"Simulated error with status {ctl.fault_status}.", event)
        elif event.get("type") != "response.create":
            await _send_error(ws, 400, f"Unsupported event type {event.get('type')!r}.", event)
        else:
            await _stream_response(ws, request, ctl, event)

    return await _serve(request, ws, handle)


async def _stream_response(ws: web.WebSocketResponse, request: web.Request, ctl: _Controls, event: dict) -> None:
    body = {k: v for k, v in event.items() if k not in ("type", "stream_id", "event_id")}
    try:
        plan = _OPENAI.responses(_Call(request, {**body, "stream": True}, ctl, request.app[STATE_KEY], True))
    except _BadRequest as exc:
        await _send_error(ws, 400, str(exc), event)
        return
    lane = {"stream_id": event["stream_id"]} if isinstance(event.get("stream_id"), str) else {}
    for index, sse in enumerate([*plan.head, *plan.chunks, *plan.tail]):
        if ctl.chunk_delay and index >= len(plan.head):
            await asyncio.sleep(ctl.chunk_delay)
        data = next(line for line in sse.split(b"\n") if line.startswith(b"data: "))[6:]
        await _send(ws, {**json.loads(data), **lane})


# Realtime ----------------------------------------------------------------------------------------------


async def _realtime(request: web.Request) -> web.StreamResponse:
    model = request.query.get("model")
    ws = await _handshake(request, ("realtime",), None if model else "Missing required parameter: 'model'.")
    if not isinstance(ws, web.WebSocketResponse):
        return ws
    state, ctl = request.app[STATE_KEY], _Controls.parse(request.headers)
    session = {"id": "sess_sim" + state.next_id(), "object": "realtime.session", "type": "realtime", "model": model,
               "output_modalities": ["text"], "instructions": None, "max_output_tokens": "inf"}
    await _send(ws, {"type": "session.created", "event_id": _event_id(state), "session": session})
    items: list[dict] = []

    async def handle(event: dict) -> None:
        kind = event.get("type")
        if kind == "session.update" and isinstance(event.get("session"), dict):
            session.update({k: v for k, v in event["session"].items() if k not in ("id", "model", "object")})
            await _send(ws, {"type": "session.updated", "event_id": _event_id(state), "session": session})
        elif kind == "conversation.item.create" and isinstance(event.get("item"), dict):
            item = {**event["item"], "id": event["item"].get("id") or "item_sim" + state.next_id(),
                    "object": "realtime.item", "status": "completed"}
            items.append(item)
            for name in ("conversation.item.added", "conversation.item.done"):
                await _send(ws, {"type": name, "event_id": _event_id(state), "previous_item_id": None, "item": item})
        elif kind == "response.create" and ctl.fault_status:
            await _send_error(ws, ctl.fault_status, f"Simulated error with status {ctl.fault_status}.", event)
        elif kind == "response.create":
            response = event.get("response") if isinstance(event.get("response"), dict) else {}
            await _realtime_response(ws, request, ctl, session, response.get("input", items), response)
        else:
            await _send_error(ws, 400, f"Unsupported event type {kind!r}.", event)

    return await _serve(request, ws, handle)


async def _realtime_response(ws: web.WebSocketResponse, request: web.Request, ctl: _Controls, session: dict,
                             prompt: Any, response: dict) -> None:
    state = request.app[STATE_KEY]
    call = _Call(request, {}, ctl, state, True)
    limit = response.get("max_output_tokens", session.get("max_output_tokens"))
    gen = call.generate(session["model"], (session.get("instructions"), response.get("instructions"), prompt), limit)
    rid, mid = "resp_sim" + state.next_id(), "item_sim" + state.next_id()
    base = {"object": "realtime.response", "id": rid, "status": "in_progress", "status_details": None, "output": [],
            "conversation_id": "conv_sim", "output_modalities": ["text"], "max_output_tokens": limit, "usage": None,
            "metadata": response.get("metadata")}
    where = {"response_id": rid, "item_id": mid, "output_index": 0, "content_index": 0}
    item = {"id": mid, "object": "realtime.item", "type": "message", "status": "in_progress", "role": "assistant",
            "content": []}
    done_item = {**item, "status": "completed", "content": [{"type": "output_text", "text": gen.text}]}
    head = [("response.created", {"response": base}),
            ("response.output_item.added", {"response_id": rid, "output_index": 0, "item": item}),
            ("response.content_part.added", {**where, "part": {"type": "output_text", "text": ""}})]
    chunks = [("response.output_text.delta", {**where, "delta": piece}) for piece in gen.pieces]
    status = "incomplete" if gen.hit_limit else "completed"
    details = {"type": status, "reason": "max_output_tokens"} if gen.hit_limit else None
    tail = [("response.output_text.done", {**where, "text": gen.text}),
            ("response.content_part.done", {**where, "part": done_item["content"][0]}),
            ("response.output_item.done", {"response_id": rid, "output_index": 0, "item": done_item}),
            ("response.done", {"response": {**base, "status": status, "status_details": details,
                                            "output": [done_item], "usage": _realtime_usage(gen.usage)}})]
    for index, (kind, fields) in enumerate([*head, *chunks, *tail]):
        if ctl.chunk_delay and index >= len(head):
            await asyncio.sleep(ctl.chunk_delay)
        await _send(ws, {"type": kind, "event_id": _event_id(state), **fields})


def _realtime_usage(u: _Usage | None) -> dict | None:
    """Realtime's usage: `input_token_details` / `output_token_details` (not Responses' `..._tokens_details`)."""
    if u is None:
        return None
    output = u.output + u.reasoning
    return {
        "total_tokens": u.prompt + output, "input_tokens": u.prompt, "output_tokens": output,
        "input_token_details": {"text_tokens": u.prompt - u.audio_input, "audio_tokens": u.audio_input,
                                "cached_tokens": u.cached,
                                "cached_tokens_details": {"text_tokens": u.cached, "audio_tokens": 0}},
        "output_token_details": {"text_tokens": output - u.audio_output, "audio_tokens": u.audio_output},
    }


def _event_id(state) -> str:
    return "event_sim" + state.next_id()
