"""A misbehaving provider (and misbehaving clients) against a real `tollway serve`.

The simulated provider (`proxy.simulator`) misbehaves politely, through aiohttp. `FaultServer` below is
a raw asyncio HTTP/1.1 server on loopback that misbehaves at the socket level on command, per request
header `x-fault` (forwarded by the gateway like any other client header): it accepts and never answers,
stalls a stream, ends a stream without its final event, answers 200 with invalid JSON or an error body,
sends 50 MB, drops the connection mid-body, answers a TLS handshake in plain text. It counts its live
connections and the ones the gateway closed on it, so upstream cancellation and connection leaks are
observable from the provider's side.

Already covered elsewhere and not repeated here: a closed port (502) and a slow provider (504) through
each SDK in `test_gateway_errors.py`; provider 4xx/5xx pass-through unchanged, ibid.; the simulator's
stall, truncate and mid-stream disconnect faults in `test_streaming.py`; retries across a key pool in
`test_failover.py`; non-JSON bodies and non-string models on the OpenAI route, ibid.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import hashlib
import json
import os
import select
import socket
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field

import httpx
import pytest

from tests.helpers import Deployment, GatewayProcess

pytestmark = pytest.mark.timeout(90)

REQUEST_ID = "x-tollway-request-id"
HUGE_BYTES = 50 * 1024 * 1024


# --- the misbehaving provider --------------------------------------------------------------------
@dataclass
class Captured:
    """One request as it arrived on the wire."""

    method: str
    target: str
    raw_headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.raw_headers if k.lower() == name.lower().encode()]
        return values[-1].decode("latin-1") if values else None

    @property
    def names(self) -> set[str]:
        return {k.decode("latin-1").lower() for k, _ in self.raw_headers}


@dataclass
class _Stats:
    accepted: int = 0
    live: int = 0
    peer_closed: int = 0  # connections the client (the gateway) closed while we were mid-answer
    tls_hellos: int = 0
    requests: list[Captured] = field(default_factory=list)


def _style(target: str) -> str:
    if "/v1/messages" in target:
        return "anthropic"
    if ":generateContent" in target or ":streamGenerateContent" in target:
        return "gemini"
    return "openai"


def _sse(payload: dict | str, event: str | None = None) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {data}\n\n".encode()


def _stream_events(style: str, model: str, words: list[str], final: bool) -> list[bytes]:
    """A provider's stream for `words`; without its closing events (and usage) unless `final`."""
    if style == "openai":
        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return _sse({"id": "chatcmpl-f", "object": "chat.completion.chunk", "created": 0, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        out = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": w}) for w in words]
        if final:
            out += [chunk({}, "stop"),
                    _sse({"id": "chatcmpl-f", "object": "chat.completion.chunk", "created": 0, "model": model,
                          "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(words),
                                                   "total_tokens": 3 + len(words)}}),
                    _sse("[DONE]")]
        return out
    if style == "anthropic":
        out = [_sse({"type": "message_start", "message": {
                    "id": "msg_f", "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}},
                    "message_start"),
               _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                    "content_block_start")]
        out += [_sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
                     "content_block_delta") for w in words]
        if final:
            out += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                    _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                          "usage": {"output_tokens": len(words)}}, "message_delta"),
                    _sse({"type": "message_stop"}, "message_stop")]
        return out
    out = [_sse({"candidates": [{"content": {"role": "model", "parts": [{"text": w}]}, "index": 0}],
                 "modelVersion": model}) for w in words]
    if final:
        out.append(_sse({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                                         "finishReason": "STOP", "index": 0}],
                         "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": len(words),
                                           "totalTokenCount": 3 + len(words)}, "modelVersion": model}))
    return out


def _answer(style: str, model: str, text: str) -> dict:
    if style == "anthropic":
        return {"id": "msg_f", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 2}}
    if style == "gemini":
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                                "index": 0}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
                "modelVersion": model}
    return {"id": "chatcmpl-f", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "X")
    return (f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n").encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- what a hostile provider sends (built once, on first use) ---------------------------------------
MiB = 1024 * 1024
BOMB_INFLATED = 1024 * MiB  # what `gzip-bomb` inflates to
_BOMB_PREFIX = (b'{"id":"chatcmpl-bomb","object":"chat.completion","created":0,"model":"gpt-4o-mini",'
                b'"choices":[{"index":0,"message":{"role":"assistant","content":"')
_BOMB_SUFFIX = (b'"},"finish_reason":"stop"}],'
                b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}')
#: One 1 KiB `data:` line (a single LF, so never a blank line); `sse-no-boundaries` sends this MiB 50 times.
SSE_LINE = b"data: " + b"x" * 1017 + b"\n"
SSE_BLOCK = SSE_LINE * 1024
SSE_BLOCKS = HUGE_BYTES // len(SSE_BLOCK)  # 50
OVERSIZED_WORD = "z" * 300_000  # the word of `sse-oversized-usage`'s long event
OCTET_BYTES = 20 * MiB


@functools.cache
def _gzip_bomb() -> bytes:
    """A gzip member (~1 MB) whose content is a chat completion with a 1 GiB string of "0"s.

    Compressing 1 GiB would take seconds; instead the raw deflate stream is assembled: after a full
    flush deflate starts afresh, so the compressed form of one 1 MiB block of "0"s is simply repeated,
    and the gzip header and trailer (CRC-32 and length of the 1 GiB) are written around it (0.3 s).
    Checked once by hand: `zlib.decompressobj(31)` inflates it to exactly 1 GiB and reaches its end."""
    block = b"0" * MiB
    blocks, rest = divmod(BOMB_INFLATED - len(_BOMB_PREFIX) - len(_BOMB_SUFFIX), len(block))
    last = b"0" * rest + _BOMB_SUFFIX
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(_BOMB_PREFIX) + deflate.flush(zlib.Z_FULL_FLUSH)
    middle = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    end = deflate.compress(last) + deflate.flush()
    crc = zlib.crc32(_BOMB_PREFIX)
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(last, crc)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no name, mtime 0, max compression
    return gzip_header + head + middle * blocks + end + struct.pack("<II", crc, BOMB_INFLATED % 2**32)


@functools.cache
def _octets() -> bytes:
    """`octet-stream`'s body: every byte value, in order, over and over (20 MiB)."""
    return bytes(range(256)) * (OCTET_BYTES // 256)


def _compressor(encoding: str):
    """A compressobj for a Content-Encoding: gzip (and its alias x-gzip), or zlib-wrapped deflate."""
    return zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS | (16 if encoding in ("gzip", "x-gzip") else 0))


class FaultServer:
    """A raw HTTP/1.1 provider on 127.0.0.1 that misbehaves per request header `x-fault`.

    Faults: `slow-headers` (read the request, never answer), `stall` (headers and the stream up to its
    second word, then silence), `slow-stream` (one event every 100 ms, 200 of them), `no-final-event` (a stream that ends
    cleanly without its closing events), `invalid-json` and `error-200` (200 with a broken or an error
    body), `huge` (50 MB: a JSON body, or SSE events when streaming), `close-mid-body` (Content-Length
    announced, a tenth sent, then the socket is reset), `status:CODE`, `echo-headers` (every request
    header reflected as an `X-Echo-*` response header). Without a fault: a well-formed
    answer in the style of the path (OpenAI, Anthropic or Gemini), streamed when asked. A TLS
    ClientHello is answered with a plain-text 400, as a plain HTTP server would.

    Faults of a provider that attacks the gateway's memory or parser (none of them asked for: the
    gateway sends `Accept-Encoding: identity`):
    `gzip-bomb` (200 JSON, `Content-Encoding: gzip`, about 1 MB that inflates to exactly 1 GiB: see
    `_gzip_bomb`), `compressed:ENC` with ENC `gzip`, `x-gzip` or `deflate` (the well-formed answer, or
    stream, compressed with it: what a provider ignoring `identity` sends), `encoding-NAME` (200 JSON
    whose `Content-Encoding` is NAME, e.g. `br` or `zstd`, over bytes that are not even that),
    `huge-chunked` (as `huge`'s JSON body but chunked, so no Content-Length announces its size),
    `sse-no-boundaries` (a 50 MiB `text/event-stream` of 1 KiB `data: xxxx` lines and not one blank
    line: `SSE_BLOCK` 50 times), `sse-oversized-usage` (the stream of the path's style with words
    "one ", `OVERSIZED_WORD` (300,000 bytes) and "two ", so one event is far longer than a small
    `max_sse_event_bytes`, its closing events and usage after it), `octet-stream` (200
    `application/octet-stream`, `_octets()`: 20 MiB with its Content-Length).
    """

    def __init__(self) -> None:
        self.stats = _Stats()
        self.port = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> FaultServer:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            pending = list(self._conns)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-server", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fault server did not start"
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return

        async def close() -> None:
            self._server.close()
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(close(), self._loop)
        self._thread.join(10)
        self._thread = None

    # observation -------------------------------------------------------------------------------
    @property
    def live(self) -> int:
        with self._lock:
            return self.stats.live

    @property
    def peer_closed(self) -> int:
        with self._lock:
            return self.stats.peer_closed

    @property
    def requests(self) -> list[Captured]:
        with self._lock:
            return list(self.stats.requests)

    def wait_live_at_most(self, count: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while self.live > count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.live

    def wait_peer_closed(self, count: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while self.peer_closed < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.peer_closed

    # serving -----------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        with self._lock:
            self.stats.accepted += 1
            self.stats.live += 1
        try:
            while await self._one(reader, writer):
                pass
        except ConnectionError:  # the client reset the connection under a write or a read mid-answer
            self._closed_by_peer()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            with self._lock:
                self.stats.live -= 1
            self._conns.discard(task)
            writer.transport.abort()

    def _closed_by_peer(self) -> bool:
        with self._lock:
            self.stats.peer_closed += 1
        return False

    @staticmethod
    async def _peer_closes(reader: asyncio.StreamReader, timeout: float) -> bool:
        """Wait up to `timeout` s; True as soon as the client closes its side of the connection."""
        try:
            return await asyncio.wait_for(reader.read(1), timeout) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False to close the connection."""
        try:
            first = await reader.read(1)
        except ConnectionError:
            return False
        if not first:
            return False
        if first == b"\x16":  # a TLS ClientHello on a plain-text port
            with self._lock:
                self.stats.tls_hellos += 1
            writer.write(_head(400, [("Content-Length", "0"), ("Connection", "close")]))
            await writer.drain()
            return False
        head = first + await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        method, target, _version = lines[0].decode("latin-1").split(" ", 2)
        raw_headers = [tuple(p.strip() for p in line.split(b":", 1)) for line in lines[1:]]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                body += (await reader.readexactly(size + 2))[:-2]
                if size == 0:
                    break
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        with self._lock:
            self.stats.requests.append(Captured(method, target, raw_headers, body))
        try:
            parsed = json.loads(body) if body else {}
        except ValueError:
            parsed = {}
        parsed = parsed if isinstance(parsed, dict) else {}
        style = _style(target)
        model = parsed.get("model") or target.rsplit("/", 1)[-1].split(":")[0]
        stream = parsed.get("stream") is True or ":streamGenerateContent" in target
        if headers.get("x-fault") == "echo-headers":  # a provider (or proxy) reflecting every request header
            body = json.dumps(_answer(style, model, "echoed")).encode()
            echoed = [(f"X-Echo-{name.decode('latin-1')}", value.decode("latin-1")) for name, value in raw_headers]
            writer.write(_head(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                     *echoed]) + body)
            await writer.drain()
            return True
        return await self._respond(headers.get("x-fault", ""), style, model, stream, reader, writer)

    async def _respond(self, fault: str, style: str, model: str, stream: bool,
                       reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        json_type, sse_type = ("Content-Type", "application/json"), ("Content-Type", "text/event-stream")
        if fault == "slow-headers":
            return self._closed_by_peer() if await self._peer_closes(reader, 60) else False
        if fault.startswith("status:"):
            status = int(fault[7:])
            body = json.dumps({"error": {"message": f"fault {status}", "type": "server_error"}}).encode()
            writer.write(_head(status, [json_type, ("Content-Length", str(len(body)))]) + body)
            await writer.drain()
            return True
        if fault in ("invalid-json", "error-200"):
            body = (b'{"id": "chatcmpl-f", "choices": [<not json' if fault == "invalid-json" else
                    json.dumps({"error": {"message": "The server had an error while processing your request.",
                                          "type": "server_error", "code": None}}).encode())
            writer.write(_head(200, [json_type, ("Content-Length", str(len(body)))]) + body)
            await writer.drain()
            return True
        if fault == "close-mid-body":
            body = json.dumps(_answer(style, model, "cut " * 2000)).encode()
            writer.write(_head(200, [json_type, ("Content-Length", str(len(body)))]) + body[: len(body) // 10])
            await writer.drain()
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                        b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return False  # aborted (reset) by _serve
        if fault in ("huge", "huge-chunked") and not stream:
            filler = "x" * (HUGE_BYTES - 300)
            body = json.dumps(_answer(style, model, filler)).encode()
            chunked = fault == "huge-chunked"
            writer.write(_head(200, [json_type, ("Transfer-Encoding", "chunked") if chunked
                                     else ("Content-Length", str(len(body)))]))
            for i in range(0, len(body), MiB):
                writer.write(_chunk(body[i:i + MiB]) if chunked else body[i:i + MiB])
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return True
        if fault in ("gzip-bomb", "octet-stream") or fault.startswith("encoding-"):
            if fault == "gzip-bomb":
                body, headers = _gzip_bomb(), [json_type, ("Content-Encoding", "gzip")]
            elif fault == "octet-stream":
                body, headers = _octets(), [("Content-Type", "application/octet-stream")]
            else:
                body = json.dumps(_answer(style, model, "not really compressed")).encode()
                headers = [json_type, ("Content-Encoding", fault.removeprefix("encoding-"))]
            writer.write(_head(200, [*headers, ("Content-Length", str(len(body)))]))
            for i in range(0, len(body), MiB):
                writer.write(body[i:i + MiB])
                await writer.drain()
            return True
        if fault.startswith("compressed:") and not stream:
            encoding = fault.removeprefix("compressed:")
            packer = _compressor(encoding)
            body = packer.compress(json.dumps(_answer(style, model, "a compressed answer")).encode()) + packer.flush()
            writer.write(_head(200, [json_type, ("Content-Encoding", encoding), ("Content-Length", str(len(body)))])
                         + body)
            await writer.drain()
            return True
        if fault in ("gzip-members", "gzip-truncated"):
            answer = json.dumps(_answer(style, model, "a compressed answer")).encode()
            if fault == "gzip-members":  # two gzip members one after the other: one body (RFC 1952 2.2)
                body = gzip.compress(answer[:40]) + gzip.compress(answer[40:])
            else:  # the end of the compressed data and its checksum never arrive
                body = gzip.compress(answer)[:-20]
            writer.write(_head(200, [json_type, ("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))])
                         + body)
            await writer.drain()
            return True
        if fault == "sse-no-boundaries":
            writer.write(_head(200, [sse_type, ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked")]))
            for _ in range(SSE_BLOCKS):
                writer.write(_chunk(SSE_BLOCK))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if not stream:
            body = json.dumps(_answer(style, model, "a well formed answer")).encode()
            writer.write(_head(200, [json_type, ("Content-Length", str(len(body)))]) + body)
            await writer.drain()
            return True

        packer = _compressor(fault.removeprefix("compressed:")) if fault.startswith("compressed:") else None
        writer.write(_head(200, [sse_type, ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked"),
                                 *([("Content-Encoding", fault.removeprefix("compressed:"))] if packer else [])]))
        if fault == "huge":
            word = "y" * (64 * 1024 - 200)
            events = _stream_events(style, model, [word] * (HUGE_BYTES // (64 * 1024)), final=True)
        elif fault == "sse-oversized-usage":
            events = _stream_events(style, model, ["one ", OVERSIZED_WORD, "two "], final=True)
        elif fault == "slow-stream":
            events = _stream_events(style, model, [f"w{i} " for i in range(200)], final=True)
        else:
            events = _stream_events(style, model, ["one ", "two ", "three ", "four "],
                                    final=fault not in ("no-final-event", "stall"))
        for index, event in enumerate(events):
            if fault == "stall" and index == len(events) - 2:  # after the first two words
                return self._closed_by_peer() if await self._peer_closes(reader, 60) else False
            if fault == "slow-stream" and index and await self._peer_closes(reader, 0.1):
                return self._closed_by_peer()
            if packer is not None:  # each event flushed on its own, as a compressing server streams
                event = packer.compress(event) + packer.flush(zlib.Z_SYNC_FLUSH)
            writer.write(_chunk(event))
            if fault == "close-mid-stream" and index == 2:
                await writer.drain()
                return False
            await writer.drain()
        if packer is not None:
            writer.write(_chunk(packer.flush()))
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


@pytest.fixture(scope="module")
def faulty():
    server = FaultServer().start()
    yield server
    server.stop()


# --- deployments, clients and checks ------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    provider: str
    token: str  # which fixture token calls it
    path: str
    stream_path: str
    body: dict
    header: str
    prefix: str = ""

    def headers(self, dep: Deployment, fault: str = "", **extra: str) -> dict[str, str]:
        headers = {self.header: self.prefix + dep.tokens[self.token], **extra}
        if fault:
            headers["x-fault"] = fault
        return headers

    def stream_body(self) -> dict:
        return self.body if self.provider == "gemini" else {**self.body, "stream": True}


PROMPT = [{"role": "user", "content": "hello fault"}]
ROUTES = {
    "openai": Route("openai", "bob", "/openai/v1/chat/completions", "/openai/v1/chat/completions",
                    {"model": "gpt-4o-mini", "messages": PROMPT}, "authorization", "Bearer "),
    "anthropic": Route("anthropic", "alice", "/anthropic/v1/messages", "/anthropic/v1/messages",
                       {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": PROMPT}, "x-api-key"),
    "gemini": Route("gemini", "carol", "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                    "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                    {"contents": [{"role": "user", "parts": [{"text": "hello fault"}]}]}, "x-goog-api-key"),
}


def _configure(dep: Deployment, urls: dict[str, str], *, read_timeout_s: float = 1, connect_timeout_s: float = 2,
               server: str = "") -> None:
    """`tollway.toml` with these providers' base URLs (the rest at the simulator) and short timeouts."""
    every = {name: f"{dep.sim_url}/{name}" for name in ROUTES} | urls
    providers = "".join(f'[providers.{name}]\nbase_url = "{url}"\nread_timeout_s = {read_timeout_s}\n'
                        f"connect_timeout_s = {connect_timeout_s}\n\n" for name, url in every.items())
    (dep.path / "tollway.toml").write_text(f'[server]\nhost = "127.0.0.1"\nport = {dep.port}\n{server}\n'
                                           f"{providers}[events]\nflush_interval_ms = 200\n")


def _rid(response: httpx.Response) -> uuid.UUID:
    value = response.headers.get(REQUEST_ID)
    assert value, f"no {REQUEST_ID} on a {response.status_code} response"
    return uuid.UUID(value)


def _error(provider: str, response: httpx.Response) -> dict:
    """The gateway's own error, in the format of the route's provider."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    _rid(response)
    body = response.json()
    if provider == "anthropic":
        assert body.get("type") == "error" and set(body) == {"type", "error"}, body
        assert isinstance(body["error"]["type"], str) and body["error"]["message"], body
    elif provider == "gemini":
        assert set(body) == {"error"} and body["error"]["code"] == response.status_code, body
        assert body["error"]["status"].isupper() and body["error"]["message"], body
    else:
        assert set(body) == {"error"} and isinstance(body["error"]["type"], str) and body["error"]["message"], body
    return body["error"]


def _stop(gw: GatewayProcess) -> dict[uuid.UUID, dict]:
    """Stop the gateway cleanly; every event by its id."""
    assert gw.stop() == 0, gw.log()
    return {row["event_id"]: row for row in gw.deployment.events()}


def _parallel(*calls):
    """Run each zero-argument callable in its own thread; their results, in order."""
    results: list = [None] * len(calls)

    def run(i, call):
        try:
            results[i] = call()
        except BaseException as exc:  # handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _raw_http(port: int, head: bytes, body_parts=(), pause: float = 0.0, read_timeout: float = 10) -> bytes:
    """Send a request head and body parts on a raw socket, stopping early once the server answers;
    the whole answer (until the server closes or a full Content-Length / chunked body arrived)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        for part in body_parts:
            time.sleep(pause)
            if select.select([s], [], [], 0)[0]:  # answered (or closed) before the body was complete
                break
            try:
                s.sendall(part)
            except OSError:
                break
        return _read_answer(s)


def _read_answer(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            lower = head.lower()
            if b"transfer-encoding: chunked" in lower and body.endswith(b"0\r\n\r\n"):
                return data
            for line in lower.split(b"\r\n"):
                if line.startswith(b"content-length:") and len(body) >= int(line.split(b":")[1]):
                    return data


def _parse_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines[1:]))
    if headers.get("transfer-encoding") == "chunked":
        out = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            out, body = out + rest[:size], rest[size + 2:]
            if size == 0:
                break
        body = out
    return int(lines[0].split()[1]), headers, body


def _text_of(provider: str, sse: bytes) -> str:
    """The answer text of an SSE body, in any of the three styles."""
    text = ""
    for line in sse.decode().splitlines():
        if not line.startswith("data:") or not line[5:].strip().startswith("{"):
            continue
        data = json.loads(line[5:])
        if provider == "openai":
            text += "".join((c.get("delta") or {}).get("content") or "" for c in data.get("choices") or ())
        elif provider == "anthropic":
            text += (data.get("delta") or {}).get("text") or ""
        else:
            text += "".join(p.get("text") or "" for c in data.get("candidates") or ()
                            for p in c["content"]["parts"])
    return text


# --- the provider never answers, or stops answering ----------------------------------------------
def test_provider_that_accepts_but_never_sends_headers_is_504_and_its_connection_is_closed(deployment, faulty):
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    closed_before = faulty.peer_closed
    try:
        def call(route: Route):
            started = time.monotonic()
            response = httpx.post(gw.url + route.path, json=route.body, timeout=15,
                                  headers=route.headers(deployment, "slow-headers"))
            return response, time.monotonic() - started

        results = _parallel(*(lambda r=r: call(r) for r in ROUTES.values()))
        assert not [r for r in results if isinstance(r, BaseException)], results
        for (response, elapsed), provider in zip(results, ROUTES, strict=True):
            assert response.status_code == 504, (provider, response.text)
            assert elapsed < 4, f"{provider}: {elapsed:.1f} s for a 1 s read timeout"
            error = _error(provider, response)
            assert "did not answer in time" in error["message"]
            assert faulty.url not in response.text
        assert [_error(p, r)["type" if p != "gemini" else "status"] for (r, _), p in zip(results, ROUTES, strict=True)] == [
            "api_error", "timeout_error", "DEADLINE_EXCEEDED"]
        # the gateway hung up on the silent provider: no half-open connection is left behind
        assert faulty.wait_peer_closed(closed_before + 3) >= closed_before + 3
    finally:
        events = _stop(gw)
    for (response, _), provider in zip(results, ROUTES, strict=True):
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("timeout", 504, provider), event
        assert event["key_id"] is not None and event["usage_source"] == "none" and event["cost_usd"] is None


def test_stream_stalling_after_its_headers_is_cut_off_after_the_read_timeout(deployment, faulty):
    """Anthropic and Gemini streams (OpenAI's: test_streaming, with the simulator's stall), side by side."""
    providers = ("anthropic", "gemini")
    _configure(deployment, {name: faulty.url for name in providers})
    gw = GatewayProcess(deployment).start()
    closed_before = faulty.peer_closed

    def stalled(provider: str):
        route, received = ROUTES[provider], b""
        started = time.monotonic()
        with httpx.Client(timeout=15) as http, http.stream(
                "POST", gw.url + route.stream_path, json=route.stream_body(),
                headers=route.headers(deployment, "stall")) as response:
            assert response.status_code == 200
            try:
                for chunk in response.iter_raw():
                    received += chunk
            except httpx.RemoteProtocolError:  # a broken stream, never a clean but short one
                return _rid(response), received, time.monotonic() - started
        raise AssertionError(f"{provider}: a stalled stream ended as if it were complete: {received!r}")

    try:
        results = dict(zip(providers, _parallel(*(lambda p=p: stalled(p) for p in providers)), strict=True))
        for provider, result in results.items():
            assert not isinstance(result, BaseException), result
            _, received, elapsed = result
            assert elapsed < 4, f"{provider}: {elapsed:.1f} s, for a 1 s read timeout"
            assert received, "what the provider sent before stalling reached the client"
            assert _text_of(provider, received) == "one two "
        assert faulty.wait_peer_closed(closed_before + 2) == closed_before + 2, "the stalled upstreams stay open"
    finally:
        events = _stop(gw)
    for provider, (request_id, _, _) in results.items():
        event = events[request_id]
        assert (event["outcome"], event["status_code"], event["streamed"]) == ("timeout", 200, True), event
        assert event["provider"] == provider


def test_stream_ending_without_its_final_event_is_relayed_as_sent_and_metered_as_estimated(deployment, faulty):
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    relayed = {}
    try:
        with httpx.Client(timeout=15) as http:
            for provider, route in ROUTES.items():
                with http.stream("POST", gw.url + route.stream_path, json=route.stream_body(),
                                 headers=route.headers(deployment, "no-final-event")) as response:
                    assert response.status_code == 200
                    body = b"".join(response.iter_raw())  # ends cleanly: no exception
                relayed[provider] = (_rid(response), body)
    finally:
        events = _stop(gw)
    for provider, (request_id, body) in relayed.items():
        model = ROUTES[provider].body.get("model", "gemini-2.5-flash")
        assert body == b"".join(_stream_events(provider, model, ["one ", "two ", "three ", "four "], final=False)), (
            f"{provider}: the stream must reach the client exactly as the provider sent it")
        assert b"[DONE]" not in body and b"message_stop" not in body and b"usageMetadata" not in body
        event = events[request_id]
        assert (event["outcome"], event["status_code"], event["streamed"]) == ("ok", 200, True), event
        assert event["usage_source"] == "estimated" and event["output_tokens"] == 5, event  # 19 chars / 4
        assert event["cost_usd"] is not None


# --- the provider answers 200, but badly ---------------------------------------------------------
def test_200_with_invalid_json_or_an_error_body_passes_through_unchanged(deployment, faulty):
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    answers = []
    try:
        with httpx.Client(timeout=15) as http:
            for provider, route in ROUTES.items():
                for fault in ("invalid-json", "error-200"):
                    response = http.post(gw.url + route.path, json=route.body, headers=route.headers(deployment, fault))
                    answers.append((provider, fault, response))
        healthy = httpx.get(gw.url + "/healthz", timeout=5).status_code
    finally:
        events = _stop(gw)
    assert healthy == 200
    for provider, fault, response in answers:
        assert response.status_code == 200, (provider, fault, response.text)
        assert response.headers["content-type"] == "application/json"
        if fault == "invalid-json":
            assert response.content == b'{"id": "chatcmpl-f", "choices": [<not json', (provider, response.content)
        else:
            assert response.json()["error"]["type"] == "server_error" and "processing" in response.text
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("ok", 200, provider), event
        if fault == "invalid-json":
            assert event["usage_source"] == "none" and event["cost_usd"] is None, event


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_50_mb_responses_are_relayed_whole_and_a_50_mb_stream_is_not_buffered(deployment, faulty):
    route = ROUTES["openai"]
    _configure(deployment, {"openai": faulty.url}, read_timeout_s=5)
    gw = GatewayProcess(deployment).start()
    try:
        peak_before = _peak_rss_kib(gw.proc.pid)
        started = time.monotonic()
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", gw.url + route.path, json=route.stream_body(),
                             headers=route.headers(deployment, "huge")) as streamed:
                assert streamed.status_code == 200
                size, tail = 0, b""
                for chunk in streamed.iter_raw():
                    size, tail = size + len(chunk), (tail + chunk)[-64:]
            stream_growth = _peak_rss_kib(gw.proc.pid) - peak_before
            whole = http.post(gw.url + route.path, json=route.body, headers=route.headers(deployment, "huge"))
        elapsed = time.monotonic() - started
    finally:
        events = _stop(gw)
    assert size > HUGE_BYTES * 0.99 and tail.endswith(b"data: [DONE]\n\n"), (size, tail)
    assert stream_growth < 25 * 1024, f"the gateway's peak memory grew {stream_growth} KiB relaying a 50 MB stream"
    assert whole.status_code == 200 and len(whole.content) > HUGE_BYTES * 0.99
    assert whole.json()["choices"][0]["message"]["content"] == "x" * (HUGE_BYTES - 300)
    assert elapsed < 20
    for response in (streamed, whole):
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"]) == ("ok", 200), event
        assert event["usage_source"] == "reported", event


# --- the provider attacks the gateway: compression bombs, oversized bodies, endless events ---------------
def _client_view(provider: str, events: list[bytes], *, hidden_usage: bool = False) -> bytes:
    """What a client receives of a provider's stream: all of it, but for the OpenAI usage chunk that
    the gateway itself asked for (`stream_options.include_usage`) when the client did not."""
    if hidden_usage:
        assert provider == "openai" and b'"choices":[],"usage"' in events[-2]
        events = events[:-2] + events[-1:]
    return b"".join(events)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_gzip_bomb_is_502_in_the_routes_format_without_inflating_it(deployment, faulty):
    """1 MB of gzip that inflates to 1 GiB, never asked for (the gateway sends Accept-Encoding: identity):
    inflated only up to [server] max_response_bytes (64 MiB by default), then refused."""
    bomb = _gzip_bomb()
    assert len(bomb) < 2 * MiB  # ~1 MB on the wire for 1 GiB inflated
    _configure(deployment, {name: faulty.url for name in ROUTES}, read_timeout_s=5)
    gw = GatewayProcess(deployment).start()
    seen = len(faulty.requests)
    answers = {}
    try:
        peak_before = _peak_rss_kib(gw.proc.pid)
        with httpx.Client(timeout=30) as http:
            for provider, route in ROUTES.items():
                started = time.monotonic()
                answers[provider] = http.post(gw.url + route.path, json=route.body,
                                              headers=route.headers(deployment, "gzip-bomb"))
                print(f"gzip bomb, {provider}: answered in {time.monotonic() - started:.2f} s")
        peak_after = _peak_rss_kib(gw.proc.pid)
        healthy = httpx.get(gw.url + "/healthz", timeout=5).status_code
    finally:
        events = _stop(gw)
    print(f"gzip bomb: gateway peak RSS {peak_before // 1024} MiB before, {peak_after // 1024} MiB after "
          f"(+{(peak_after - peak_before) // 1024} MiB)")
    assert healthy == 200
    assert peak_after < 400 * 1024, f"the gateway's peak RSS reached {peak_after // 1024} MiB on a gzip bomb"
    assert [r.header("accept-encoding") for r in faulty.requests[seen:]] == ["identity"] * 3
    for provider, response in answers.items():
        assert response.status_code == 502, (provider, response.status_code, response.text[:300])
        assert "content-encoding" not in response.headers
        assert "max_response_bytes" in _error(provider, response)["message"], response.text
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("upstream_error", 502, provider), event
        assert event["usage_source"] == "none" and event["cost_usd"] is None, event


def test_compressed_answers_and_streams_are_relayed_decoded_and_metered(deployment, faulty):
    """A provider that compresses although asked for `identity`: gzip, x-gzip and deflate answers reach the
    client decoded (no Content-Encoding, the decoded length), and their usage is read."""
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    seen = len(faulty.requests)
    whole, streamed = [], {}
    try:
        with httpx.Client(timeout=15) as http:
            for provider, route in ROUTES.items():
                for encoding in ("gzip", "x-gzip", "deflate"):
                    whole.append((provider, encoding, http.post(
                        gw.url + route.path, json=route.body, headers=route.headers(deployment, f"compressed:{encoding}"))))
                with http.stream("POST", gw.url + route.stream_path, json=route.stream_body(),
                                 headers=route.headers(deployment, "compressed:gzip")) as response:
                    assert response.status_code == 200
                    streamed[provider] = (response.headers, b"".join(response.iter_raw()), _rid(response))
    finally:
        events = _stop(gw)
    assert len(faulty.requests) == seen + 12
    assert {r.header("accept-encoding") for r in faulty.requests[seen:]} == {"identity"}
    for provider, encoding, response in whole:
        model = ROUTES[provider].body.get("model", "gemini-2.5-flash")
        expected = json.dumps(_answer(provider, model, "a compressed answer")).encode()
        assert response.status_code == 200, (provider, encoding, response.text[:300])
        assert "content-encoding" not in response.headers, (provider, encoding, response.headers)
        assert response.headers["content-length"] == str(len(expected))
        assert response.content == expected, (provider, encoding)
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["usage_source"]) == ("ok", 200, "reported"), event
        assert (event["input_tokens"], event["output_tokens"]) == (3, 2), event
        assert event["cost_usd"] is not None
    for provider, (headers, body, request_id) in streamed.items():
        model = ROUTES[provider].body.get("model", "gemini-2.5-flash")
        words = ["one ", "two ", "three ", "four "]
        expected = _client_view(provider, _stream_events(provider, model, words, final=True),
                                hidden_usage=provider == "openai")
        assert "content-encoding" not in headers and headers["content-type"] == "text/event-stream", headers
        assert body == expected, provider
        event = events[request_id]
        assert (event["outcome"], event["usage_source"], event["streamed"]) == ("ok", "reported", True), event
        assert (event["input_tokens"], event["output_tokens"]) == (3, 4), event


def test_gzip_of_several_members_is_one_body_and_a_truncated_gzip_is_502_never_a_short_200(deployment, faulty):
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    route = ROUTES["openai"]
    try:
        with httpx.Client(timeout=15) as http:
            members = http.post(gw.url + route.path, json=route.body, headers=route.headers(deployment, "gzip-members"))
            truncated = http.post(gw.url + route.path, json=route.body,
                                  headers=route.headers(deployment, "gzip-truncated"))
    finally:
        events = _stop(gw)
    expected = json.dumps(_answer("openai", "gpt-4o-mini", "a compressed answer")).encode()
    assert members.status_code == 200 and members.content == expected
    assert (events[_rid(members)]["input_tokens"], events[_rid(members)]["output_tokens"]) == (3, 2)
    assert truncated.status_code == 502, truncated.text
    assert "could not be decoded" in _error("openai", truncated)["message"]
    assert (events[_rid(truncated)]["outcome"], events[_rid(truncated)]["status_code"]) == ("upstream_error", 502)


def test_encodings_the_gateway_cannot_read_are_502_in_the_routes_format(deployment, faulty):
    """br and zstd (which the gateway never asked for) are refused, not relayed as if they were JSON;
    a gzip body that is not gzip is refused too."""
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    cases = [(provider, "encoding-br") for provider in ROUTES] + [("openai", "encoding-zstd"),
                                                                  ("anthropic", "encoding-gzip")]
    answers = []
    try:
        with httpx.Client(timeout=15) as http:
            for provider, fault in cases:
                route = ROUTES[provider]
                answers.append(http.post(gw.url + route.path, json=route.body,
                                         headers=route.headers(deployment, fault)))
        healthy = httpx.get(gw.url + "/healthz", timeout=5).status_code
    finally:
        events = _stop(gw)
    assert healthy == 200
    for (provider, fault), response in zip(cases, answers, strict=True):
        assert response.status_code == 502, (provider, fault, response.text)
        assert "content-encoding" not in response.headers
        message = _error(provider, response)["message"]
        encoding = fault.removeprefix("encoding-")
        assert (f"{encoding!r}" in message if encoding != "gzip" else "could not be decoded" in message), message
        assert "not really compressed" not in response.text
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("upstream_error", 502, provider), event
        assert event["usage_source"] == "none", event


def test_json_answers_past_max_response_bytes_are_502_but_streams_are_not_capped(deployment, faulty):
    """[server] max_response_bytes = 1 MiB: a 50 MB JSON answer, announced by its Content-Length or chunked,
    is refused in each route's format; a 50 MB stream still passes whole."""
    _configure(deployment, {name: faulty.url for name in ROUTES}, read_timeout_s=5,
               server="max_response_bytes = 1048576")
    gw = GatewayProcess(deployment).start()
    refused = []
    try:
        with httpx.Client(timeout=30) as http:
            for provider, route in ROUTES.items():
                for fault in ("huge", "huge-chunked"):
                    refused.append((provider, fault, http.post(gw.url + route.path, json=route.body,
                                                               headers=route.headers(deployment, fault))))
            route = ROUTES["openai"]
            with http.stream("POST", gw.url + route.path, json=route.stream_body(),
                             headers=route.headers(deployment, "huge")) as streamed:
                assert streamed.status_code == 200
                size, tail = 0, b""
                for chunk in streamed.iter_raw():
                    size, tail = size + len(chunk), (tail + chunk)[-64:]
        healthy = httpx.get(gw.url + "/healthz", timeout=5).status_code
    finally:
        events = _stop(gw)
    assert healthy == 200
    for provider, fault, response in refused:
        assert response.status_code == 502, (provider, fault, response.status_code, response.text[:300])
        message = _error(provider, response)["message"]
        assert "max_response_bytes" in message and "1048576" in message, message
        assert len(response.content) < 4096
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("upstream_error", 502, provider), event
    # 800 events with a word of 65,336 bytes each, as the fault server builds them, the usage chunk hidden
    word = "y" * (64 * 1024 - 200)
    sent = _client_view("openai", _stream_events("openai", "gpt-4o-mini", [word] * 800, final=True), hidden_usage=True)
    assert size == len(sent) > HUGE_BYTES * 0.99 and tail == sent[-64:], (size, tail)
    event = events[_rid(streamed)]
    assert (event["outcome"], event["status_code"], event["usage_source"]) == ("ok", 200, "reported"), event
    assert event["output_tokens"] == HUGE_BYTES // (64 * 1024), event


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_non_json_bodies_pass_through_uncapped_with_their_content_length(deployment, faulty):
    """20 MiB of application/octet-stream under a 1 MiB max_response_bytes: relayed byte for byte,
    its Content-Length kept, never held whole."""
    _configure(deployment, {"openai": faulty.url}, read_timeout_s=5, server="max_response_bytes = 1048576")
    route = ROUTES["openai"]
    expected = _octets()
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=30) as http:
            assert http.post(gw.url + route.path, json=route.body, headers=route.headers(deployment)).status_code == 200
            peak_before = _peak_rss_kib(gw.proc.pid)
            with http.stream("POST", gw.url + route.path, json=route.body,
                             headers=route.headers(deployment, "octet-stream")) as response:
                headers = response.headers
                body = b"".join(response.iter_raw())
            growth = _peak_rss_kib(gw.proc.pid) - peak_before
    finally:
        events = _stop(gw)
    print(f"20 MiB octet-stream: the gateway's peak RSS grew {growth} KiB")
    assert response.status_code == 200
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-length"] == str(20 * 1024 * 1024) and "transfer-encoding" not in headers, headers
    assert len(body) == 20 * 1024 * 1024 and body == expected
    assert growth < 10 * 1024, f"the gateway's peak memory grew {growth} KiB relaying 20 MiB: it was held"
    event = events[_rid(response)]
    assert (event["outcome"], event["status_code"]) == ("ok", 200), event


SSE_CAP = 1024 * 1024  # max_sse_event_bytes for the boundary-less stream


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_a_50_mb_stream_without_a_blank_line_passes_whole_in_bounded_memory(deployment, faulty):
    """50 MiB of `data:` lines and no event boundary, with max_sse_event_bytes = 1 MiB, through the OpenAI
    route (whose usage chunk the gateway filters, so every byte goes through the parser): it arrives whole,
    /healthz answers while it streams, and the gateway's peak memory grows by less than 3 caps."""
    _configure(deployment, {"openai": faulty.url}, read_timeout_s=5, server=f"max_sse_event_bytes = {SSE_CAP}")
    route = ROUTES["openai"]
    expected = hashlib.sha256()
    for _ in range(SSE_BLOCKS):
        expected.update(SSE_BLOCK)
    gw = GatewayProcess(deployment).start()
    checks: list = []  # per /healthz while the stream runs: True, or what went wrong
    streaming, done = threading.Event(), threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=2) as client:
            while not done.is_set():
                try:
                    response = client.get(gw.url + "/healthz")
                    result = response.status_code == 200 or response.status_code
                except httpx.HTTPError as exc:
                    result = repr(exc)
                checks.append((result, streaming.is_set()))
                time.sleep(0.02)

    try:
        with httpx.Client(timeout=30) as http:
            # first a well-formed 50 MB stream (events of 64 KiB): what relaying 50 MB costs anyway is paid
            # before the measure, which then shows what the missing boundaries add
            started = time.monotonic()
            with http.stream("POST", gw.url + route.path, json=route.stream_body(),
                             headers=route.headers(deployment, "huge")) as framed:
                framed_size = sum(len(chunk) for chunk in framed.iter_raw())
            framed_s = time.monotonic() - started
            peak_before = _peak_rss_kib(gw.proc.pid)
            prober = threading.Thread(target=probe, name="healthz-prober")
            started = time.monotonic()
            with http.stream("POST", gw.url + route.path, json=route.stream_body(),
                             headers=route.headers(deployment, "sse-no-boundaries")) as streamed:
                assert streamed.status_code == 200 and streamed.headers["content-type"] == "text/event-stream"
                streaming.set()
                prober.start()
                size, digest, milestone, waited = 0, hashlib.sha256(), 8 * MiB, 0
                for chunk in streamed.iter_raw():
                    size += len(chunk)
                    digest.update(chunk)
                    if size >= milestone and milestone <= 40 * MiB:  # at 8, 16, ... 40 MiB: one more check
                        milestone += 8 * MiB
                        asked = len(checks)
                        deadline = time.monotonic() + 5
                        while len(checks) <= asked and time.monotonic() < deadline:
                            time.sleep(0.005)
                        waited += 1
                streaming.clear()
            through_s = time.monotonic() - started
            done.set()
            prober.join(10)
            growth = _peak_rss_kib(gw.proc.pid) - peak_before
            started = time.monotonic()
            with http.stream("POST", faulty.url + "/v1/chat/completions", json=route.stream_body(),
                             headers={"x-fault": "sse-no-boundaries"}) as direct:
                direct_size = sum(len(chunk) for chunk in direct.iter_raw())
            direct_s = time.monotonic() - started
    finally:
        done.set()
        events = _stop(gw)
    during = [result for result, in_stream in checks if in_stream]
    print(f"50 MiB without a blank line: {through_s:.2f} s through the gateway, {direct_s:.2f} s direct "
          f"(a framed 50 MB stream: {framed_s:.2f} s through the gateway); peak RSS +{growth} KiB "
          f"(cap {SSE_CAP // 1024} KiB); {len(during)} /healthz answered during the stream")
    assert direct_size == HUGE_BYTES and framed_size > HUGE_BYTES * 0.99
    assert size == HUGE_BYTES and digest.hexdigest() == expected.hexdigest(), size
    assert waited == 5 and len(during) >= 5, (waited, checks)
    assert all(result is True for result, _ in checks), [r for r, _ in checks if r is not True]
    # Bounded by the cap, not by the stream: 4.6-6.7 MiB measured here with a 1 MiB cap (the parser alone
    # peaks at about 3 caps: its buffer, a slice of it and that slice's bytes copy; plus transport buffers
    # and allocator slack), 53-85 MiB with the default 16 MiB cap, and holding the whole event would
    # cost over 50 MiB. 12 caps leaves room for the allocator yet fails if the cap is not honoured.
    assert growth < 12 * SSE_CAP // 1024, f"peak RSS grew {growth} KiB for a {SSE_CAP // 1024} KiB event cap"
    event = events[_rid(streamed)]
    assert (event["outcome"], event["status_code"], event["streamed"]) == ("ok", 200, True), event
    assert event["usage_source"] != "reported" and not event["output_tokens"], event  # nothing was read from it


def test_an_sse_event_past_the_cap_is_relayed_untouched_and_usage_still_read(deployment, faulty):
    """One event of 300 kB with max_sse_event_bytes = 64 KiB, then the stream's closing events: every byte
    reaches the client in order, and the usage comes from the (normal) events after the long one."""
    cap = 64 * 1024
    _configure(deployment, {name: faulty.url for name in ROUTES}, server=f"max_sse_event_bytes = {cap}")
    openai = ROUTES["openai"]
    cases = [("openai", openai.stream_body(), True),  # the gateway asks for the usage chunk, and hides it
             ("openai", {**openai.stream_body(), "stream_options": {"include_usage": True}}, False),
             ("anthropic", ROUTES["anthropic"].stream_body(), False),
             ("gemini", ROUTES["gemini"].stream_body(), False)]
    gw = GatewayProcess(deployment).start()
    relayed = []
    try:
        with httpx.Client(timeout=15) as http:
            for provider, body, _ in cases:
                route = ROUTES[provider]
                with http.stream("POST", gw.url + route.stream_path, json=body,
                                 headers=route.headers(deployment, "sse-oversized-usage")) as response:
                    assert response.status_code == 200
                    relayed.append((b"".join(response.iter_raw()), _rid(response)))
    finally:
        events = _stop(gw)
    for (provider, _, hidden), (received, request_id) in zip(cases, relayed, strict=True):
        model = ROUTES[provider].body.get("model", "gemini-2.5-flash")
        sent = _stream_events(provider, model, ["one ", OVERSIZED_WORD, "two "], final=True)
        long_event = sent[{"openai": 2, "anthropic": 3, "gemini": 1}[provider]]
        assert OVERSIZED_WORD.encode() in long_event and len(long_event) > 4 * cap
        assert received == _client_view(provider, sent, hidden_usage=hidden), (provider, hidden)
        event = events[request_id]
        assert (event["outcome"], event["status_code"], event["usage_source"]) == ("ok", 200, "reported"), event
        assert (event["input_tokens"], event["output_tokens"]) == (3, 3), (provider, hidden, event)


def test_provider_resetting_the_connection_mid_body_is_502_or_a_broken_stream(deployment, faulty):
    _configure(deployment, {name: faulty.url for name in ROUTES})
    gw = GatewayProcess(deployment).start()
    cut, broken = {}, {}
    try:
        with httpx.Client(timeout=15) as http:
            for provider, route in ROUTES.items():
                cut[provider] = http.post(gw.url + route.path, json=route.body,
                                          headers=route.headers(deployment, "close-mid-body"))
                with http.stream("POST", gw.url + route.stream_path, json=route.stream_body(),
                                 headers=route.headers(deployment, "close-mid-stream")) as response:
                    assert response.status_code == 200
                    broken[provider] = _rid(response)
                    with pytest.raises(httpx.RemoteProtocolError):  # the client can tell it was cut
                        for _ in response.iter_raw():
                            pass
    finally:
        events = _stop(gw)
    for provider, response in cut.items():
        assert response.status_code == 502, (provider, response.text)
        assert "could not be reached" in _error(provider, response)["message"]
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"]) == ("upstream_error", 502), event
        stream_event = events[broken[provider]]
        assert (stream_event["outcome"], stream_event["status_code"], stream_event["streamed"]) == (
            "upstream_error", 200, True), stream_event


def test_tls_to_a_plain_port_and_an_unresolvable_host_are_502_without_a_hang(deployment, faulty):
    tls = f"https://127.0.0.1:{faulty.port}"
    _configure(deployment, {"openai": tls, "anthropic": f"http://tollway-fault-{os.getpid()}.invalid",
                            "gemini": tls})
    gw = GatewayProcess(deployment).start()
    hellos_before = faulty.stats.tls_hellos
    try:
        results = []
        with httpx.Client(timeout=15) as http:
            for provider, route in ROUTES.items():
                started = time.monotonic()
                response = http.post(gw.url + route.path, json=route.body, headers=route.headers(deployment))
                results.append((provider, response, time.monotonic() - started))
        assert faulty.stats.tls_hellos == hellos_before + 2, "the https providers were really tried over TLS"
    finally:
        events = _stop(gw)
    for provider, response, elapsed in results:
        assert response.status_code == 502 and elapsed < 5, (provider, response.text, elapsed)
        message = _error(provider, response)["message"]
        assert "could not be reached" in message and ".invalid" not in message and str(faulty.port) not in message
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"], event["provider"]) == ("upstream_error", 502, provider)
        assert event["key_id"] is not None and event["usage_source"] == "none"


# --- the client misbehaves -----------------------------------------------------------------------
def _request_head(dep: Deployment, path: str, extra: str, credential: str = "") -> bytes:
    """A POST's head, with bob's token unless another credential line is given."""
    credential = credential or f"Authorization: Bearer {dep.tokens['bob']}"
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\n{credential}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def test_client_leaving_before_its_answer_is_recorded_as_cancelled(deployment, faulty):
    """Mid-body: nothing is forwarded. While the provider is silent: the upstream request is dropped."""
    _configure(deployment, {"openai": faulty.url}, read_timeout_s=5)
    seen, closed_before = len(faulty.requests), faulty.peer_closed
    body = json.dumps(ROUTES["openai"].body).encode()
    gw = GatewayProcess(deployment).start()
    try:
        with socket.create_connection(("127.0.0.1", deployment.port), timeout=5) as s:
            s.sendall(_request_head(deployment, "/openai/v1/chat/completions", "Content-Length: 400\r\n"))
            s.sendall(b'{"model": "gpt-4o-mini", "messages": [{"role"')
            time.sleep(0.3)
        time.sleep(0.3)
        assert len(faulty.requests) == seen, "half a request must not be forwarded"

        with socket.create_connection(("127.0.0.1", deployment.port), timeout=5) as s:
            s.sendall(_request_head(deployment, "/openai/v1/chat/completions",
                                    f"Content-Length: {len(body)}\r\nx-fault: slow-headers\r\n") + body)
            deadline = time.monotonic() + 3
            while len(faulty.requests) == seen and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(faulty.requests) == seen + 1
        left_at = time.monotonic()
        assert faulty.wait_peer_closed(closed_before + 1, timeout=3) == closed_before + 1
        assert time.monotonic() - left_at < 1.5, "the upstream request outlived its client (read timeout is 5 s)"
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
    finally:
        events = _stop(gw)
    mid_body, silent = sorted(events.values(), key=lambda e: e["ts"])
    assert (mid_body["outcome"], mid_body["status_code"], mid_body["provider"]) == ("cancelled", 499, "openai")
    assert (silent["outcome"], silent["status_code"], silent["tenant"]) == ("cancelled", 499, "acme"), silent
    assert silent["latency_ms"] < 2000 and silent["key_id"] == "operator-openai", silent


def test_slow_loris_body_is_refused_after_body_timeout_s_in_the_routes_format(deployment, faulty):
    _configure(deployment, {"openai": faulty.url}, server="body_timeout_s = 1")
    seen = len(faulty.requests)
    body = json.dumps(ROUTES["openai"].body).encode()
    gw = GatewayProcess(deployment).start()
    try:
        started = time.monotonic()
        raw = _raw_http(deployment.port, _request_head(deployment, "/openai/v1/chat/completions",
                                               f"Content-Length: {len(body)}\r\n"),
                        [body[i:i + 4] for i in range(0, len(body), 4)], pause=0.25)
        elapsed = time.monotonic() - started
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
    finally:
        events = _stop(gw)
    assert elapsed < 4, f"{elapsed:.1f} s to give up on a body allowed 1 s"
    status, headers, payload = _parse_answer(raw)
    assert status == 408, raw[:300]
    assert headers["content-type"].startswith("application/json") and REQUEST_ID in headers
    error = json.loads(payload)["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert len(faulty.requests) == seen
    event = events[uuid.UUID(headers[REQUEST_ID])]
    assert (event["status_code"], event["outcome"]) == (408, "bad_request"), event


def test_oversized_bodies_are_413_before_they_are_read(deployment, faulty):
    """Extends test_gateway_errors' 413 test: the gateway answers without waiting for the body."""
    _configure(deployment, {"openai": faulty.url, "anthropic": faulty.url}, server="max_body_bytes = 65536")
    seen = len(faulty.requests)
    gw = GatewayProcess(deployment).start()
    try:
        # a 50 MB Content-Length with only the first bytes sent: answered at once
        with socket.create_connection(("127.0.0.1", deployment.port), timeout=5) as s:
            started = time.monotonic()
            s.sendall(_request_head(deployment, "/openai/v1/chat/completions", "Content-Length: 52428800\r\n")
                      + b'{"model": "gpt-4o-mini", "messages": [')
            declared = _read_answer(s)
            declared_after = time.monotonic() - started
        # a chunked upload that would never end: cut off once it passes the limit
        with socket.create_connection(("127.0.0.1", deployment.port), timeout=5) as s:
            s.sendall(_request_head(deployment, "/anthropic/v1/messages", "Transfer-Encoding: chunked\r\n",
                                    f"x-api-key: {deployment.tokens['alice']}"))
            s.setblocking(False)
            sent, chunked = 0, b""
            piece = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
            deadline = time.monotonic() + 10
            while not chunked.endswith(b"0\r\n\r\n") and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    data = s.recv(65536)
                    if not data:
                        break
                    chunked += data
                    continue
                if sent < HUGE_BYTES:
                    with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                        sent += s.send(piece)
                else:
                    time.sleep(0.01)
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
    finally:
        events = _stop(gw)
    status, headers, body = _parse_answer(declared)
    assert status == 413 and declared_after < 2, (declared[:300], declared_after)
    assert json.loads(body)["error"]["code"] == "request_too_large"
    status2, headers2, body2 = _parse_answer(chunked)
    assert status2 == 413, chunked[:300]
    assert json.loads(body2)["error"]["type"] == "request_too_large"
    assert sent < HUGE_BYTES, "the gateway kept reading a body it had already refused"
    assert len(faulty.requests) == seen
    for rid in (headers[REQUEST_ID], headers2[REQUEST_ID]):
        event = events[uuid.UUID(rid)]
        assert (event["outcome"], event["status_code"]) == ("bad_request", 413), event


def test_malformed_bodies_on_the_anthropic_and_gemini_routes_are_400(deployment, faulty):
    """test_gateway_errors covers the OpenAI route's variants; the other formats here."""
    _configure(deployment, {name: faulty.url for name in ROUTES})
    seen = len(faulty.requests)
    anthropic, gemini = ROUTES["anthropic"], ROUTES["gemini"]
    cases = [("anthropic", {**anthropic.body, "model": None}), ("anthropic", {**anthropic.body, "model": {"id": 1}}),
             ("anthropic", {**anthropic.body, "model": 7}), ("anthropic", "claude-sonnet-4-5"),
             ("anthropic", b"\xff\xfe not json"), ("gemini", [gemini.body]), ("gemini", b"")]
    gw = GatewayProcess(deployment).start()
    responses = []
    try:
        with httpx.Client(timeout=10) as http:
            for provider, body in cases:
                route = ROUTES[provider]
                content = body if isinstance(body, bytes) else json.dumps(body).encode()
                responses.append(http.post(gw.url + route.path, content=content,
                                           headers=route.headers(deployment, **{"content-type": "application/json"})))
    finally:
        events = _stop(gw)
    for (provider, body), response in zip(cases, responses, strict=True):
        assert response.status_code == 400, (provider, body, response.text)
        error = _error(provider, response)
        assert error.get("type", error.get("status")) in ("invalid_request_error", "INVALID_ARGUMENT"), error
        event = events[_rid(response)]
        assert (event["outcome"], event["status_code"]) == ("bad_request", 400), event
    assert len(faulty.requests) == seen, "a malformed request never reaches the provider"


def test_client_leaving_mid_stream_closes_the_upstream_connection_at_once(deployment, faulty):
    _configure(deployment, {name: faulty.url for name in ROUTES}, read_timeout_s=5)
    gw = GatewayProcess(deployment).start()
    left = {}
    try:
        with httpx.Client(timeout=15) as http:
            for provider, route in ROUTES.items():
                closed_before = faulty.peer_closed
                with http.stream("POST", gw.url + route.stream_path, json=route.stream_body(),
                                 headers=route.headers(deployment, "slow-stream")) as response:
                    assert response.status_code == 200
                    left[provider] = _rid(response)
                    seen = 0
                    for line in response.iter_lines():
                        seen += line.startswith("data:")
                        if seen == 4:
                            break  # leaving the block closes the client connection mid-stream
                left_at = time.monotonic()
                assert faulty.wait_peer_closed(closed_before + 1, timeout=3) == closed_before + 1, (
                    f"{provider}: the provider kept streaming to nobody")
                assert time.monotonic() - left_at < 1.5, "the upstream request is cancelled at once"
                assert faulty.wait_live_at_most(0, timeout=3) == 0
    finally:
        events = _stop(gw)
    for provider, request_id in left.items():
        event = events[request_id]
        assert (event["outcome"], event["status_code"], event["streamed"]) == ("cancelled", 499, True), event
        assert event["provider"] == provider and event["latency_ms"] < 4000, event


def test_faulted_requests_leave_no_connection_to_the_provider_open(deployment, faulty):
    route = ROUTES["openai"]
    _configure(deployment, {"openai": faulty.url})
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=15) as http:
            def post(fault: str = "") -> httpx.Response:
                return http.post(gw.url + route.path, json=route.body, headers=route.headers(deployment, fault))

            def stream(fault: str, leave_after: int | None = None) -> int:
                with http.stream("POST", gw.url + route.path, json=route.stream_body(),
                                 headers=route.headers(deployment, fault)) as response, \
                        contextlib.suppress(httpx.RemoteProtocolError):
                    for seen, _ in enumerate(response.iter_lines()):
                        if seen == leave_after:
                            break
                return response.status_code

            assert post().status_code == 200
            baseline = faulty.wait_live_at_most(1)
            assert baseline == 1, "one pooled keep-alive connection after one good answer"
            statuses = [post(f).status_code for f in ("slow-headers", "close-mid-body", "invalid-json", "error-200",
                                                      "status:500")]
            statuses += [stream(f) for f in ("stall", "close-mid-stream", "no-final-event")]
            statuses.append(stream("slow-stream", leave_after=3))
            assert statuses == [504, 502, 200, 200, 500, 200, 200, 200, 200]
        # and a burst of concurrent silent providers
        burst = _parallel(*(lambda: httpx.post(gw.url + route.path, json=route.body, timeout=15,
                                               headers=route.headers(deployment, "slow-headers")),) * 8)
        assert [getattr(r, "status_code", r) for r in burst] == [504] * 8
        assert faulty.wait_live_at_most(baseline) <= baseline, (
            f"{faulty.live} connections to the provider left open after the faults (baseline {baseline})")
        assert httpx.post(gw.url + route.path, json=route.body, timeout=10,
                          headers=route.headers(deployment)).status_code == 200
    finally:
        events = _stop(gw)
    assert len(events) == 1 + 9 + 8 + 1
