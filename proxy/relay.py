"""Relaying a provider's answer to the client: JSON read whole (for its usage and cost header), streams
passed on chunk by chunk with usage read on the side, any other body passed on as it arrives, and batch
results read line by line as they pass (`proxy.object_calls` meters them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from proxy import object_calls
from proxy.batch_results import ResultLines
from proxy.meter import meter
from proxy.providers.base import json_decode
from proxy.sse import SseParser

if TYPE_CHECKING:
    from proxy.forward import Call
    from proxy.gateway import Gateway, ProviderRoute
    from proxy.upstream import UpstreamResponse

COST_HEADER = b"x-tollway-cost-usd"


async def relay_body(gw: Gateway, call: Call, route: ProviderRoute, response: UpstreamResponse, headers: list,
                      send, limit: int) -> None:
    """A JSON answer, read whole (at most `limit` bytes) for its usage and its cost header."""
    body = await response.read(limit)
    if response.status < 400 and body:
        try:
            payload = json_decode(body)
        except (msgspec.DecodeError, RecursionError):
            payload = None
        if payload is not None:
            if call.info.metered:
                call.usage, call.estimate_output_chars = route.adapter.read_body(payload)
            if call.objects is not None:
                body = await object_calls.observe(gw, route, call, payload) or body
    meter(call, route)  # now, so that the response can say what it cost
    if call.event.cost_usd is not None:
        headers.append((COST_HEADER, f"{call.event.cost_usd:f}".encode()))  # never 1.2E-8
    headers.append((b"content-length", str(len(body)).encode()))
    call.response_started = True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    call.event.ttfb_ms = call.elapsed_ms()
    await send({"type": "http.response.body", "body": body})


async def relay_raw(call: Call, response: UpstreamResponse, headers: list, send, tee=None, before_end=None) -> None:
    """Any other body, passed on as it arrives (its length kept when it is not decoded here); `tee`
    sees each chunk too, and `before_end` is awaited before the last (empty) piece: once a response is
    complete the server reports the client gone, and the request's task is cancelled."""
    length = None if response.decoded else response.header("content-length")
    if length is not None:
        headers.append((b"content-length", length.encode("latin-1")))
    call.response_started = True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async for chunk in response.chunks():
        if call.event.ttfb_ms is None:
            call.event.ttfb_ms = call.elapsed_ms()
        if tee is not None:
            tee(chunk)
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if before_end is not None:
        await before_end()
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def relay_stream(gw: Gateway, route: ProviderRoute, call: Call, response: UpstreamResponse, headers: list,
                        send, max_event_bytes: int) -> None:
    """Pass each chunk on as it arrives; read usage from complete events on the side."""
    tap = route.adapter.stream_tap(call.info)
    call.usage, call.estimate_output_chars = tap.usage, 0  # filled in as events pass: a cut stream keeps them
    parser = SseParser(max_event_bytes)
    filtering = tap.hide_usage_event
    call.response_started = True
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async for chunk in response.chunks():
        if call.event.ttfb_ms is None:
            call.event.ttfb_ms = call.elapsed_ms()
        events = parser.feed(chunk)
        if filtering:
            chunk = b"".join(e.raw for e in events if e.unread or tap.feed(e))
        else:
            for e in events:
                if not e.unread:
                    tap.feed(e)
        call.estimate_output_chars = tap.text_chars
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    tail = b"".join(e.raw for e in parser.close() if e.unread or tap.feed(e))  # a last event without its blank line
    call.estimate_output_chars = tap.text_chars
    if tap.object_id is not None and call.objects is not None:  # a stored response, named in its first event
        object_calls.record_created(gw, route, call, tap.object_id)
    await send({"type": "http.response.body", "body": tail if filtering else b"", "more_body": False})


async def relay_results(gw: Gateway, route: ProviderRoute, call: Call, response: UpstreamResponse, headers: list,
                         send) -> None:
    """Relay the results unchanged, reading each line; meter them once the whole file went through."""
    lines = ResultLines()

    async def meter_lines() -> None:
        lines.close()
        await object_calls.meter_results(gw, route, call, lines.answers)

    await relay_raw(call, response, headers, send, lines.feed, meter_lines)
