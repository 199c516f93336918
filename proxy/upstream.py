"""The upstream HTTP client (aiohttp), and the one place its exceptions become gateway errors.

aiohttp is used because it kept its throughput flat under concurrency where httpx's pool did not
(see the README's performance section). Per provider: a connect timeout and a read timeout
(the longest silence while waiting for headers or the next chunk).

No aiohttp type leaves this module: `request` yields an `UpstreamResponse`, `websocket` returns an
`UpstreamSocket`. Bodies are never
decompressed behind the gateway's back: it asks for `identity`, and a provider that compresses
anyway is inflated here in bounded steps (at most `_STEP` bytes per step, and `read` stops at its
limit), so a 1 MB gzip that inflates to 1 GiB costs neither memory nor a stalled event loop.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress

import aiohttp
from yarl import URL

from proxy.errors import UpstreamRefused, UpstreamTimeout, UpstreamTooLarge, UpstreamUnreachable
from proxy.settings import ProviderSettings

_STEP = 256 * 1024  # the most bytes inflated at once
WS_MAX_MESSAGE = 16 * 1024 * 1024  # the largest WebSocket message relayed (as uvicorn's ws_max_size)
#: zlib window bits per Content-Encoding: gzip, or deflate (zlib-wrapped, as RFC 9110 defines it).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UpstreamResponse:
    """A provider's response: status and headers read, the body still on the wire."""

    def __init__(self, response: aiohttp.ClientResponse, provider: str) -> None:
        self._response = response
        self._provider = provider
        self.status = response.status
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = response.raw_headers
        self.content_type = response.content_type  # media type only, lower case
        self.decoded = False  # True: the body will differ from the bytes on the wire
        self._inflater: _Inflater | None = None
        encoding = response.headers.get("content-encoding")
        if encoding is not None:  # the provider compressed although asked for identity
            self._decode(encoding.strip().lower(), provider)

    def _decode(self, encoding: str, provider: str) -> None:
        if encoding in ("", "identity"):
            return
        if encoding not in _DECODERS:
            raise UpstreamUnreachable(f"The provider {provider!r} answered with a body encoded as {encoding!r}, "
                                      "which Tollway did not ask for and cannot read. Try again later.")
        self.decoded, self._inflater = True, _Inflater(_DECODERS[encoding])

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (decoded, in pieces of at most `_STEP` bytes when it was compressed)."""
        if self._inflater is None:
            return self._response.content.iter_any()
        return self._inflated()

    async def _inflated(self) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_any():
            for piece in self._inflater.feed(chunk, self._provider):
                yield piece
        tail = self._inflater.flush(self._provider)
        if tail:
            yield tail

    async def read(self, limit: int) -> bytes:
        """The whole body, or `UpstreamTooLarge` as soon as it passes `limit` bytes (decoded)."""
        length = self._response.content_length
        if length is not None and self._inflater is None:  # the common case: its size is announced
            if length > limit:
                raise _too_large(self._provider, limit)
            return await self._response.read()
        parts, size = [], 0
        async for piece in self.chunks():
            size += len(piece)
            if size > limit:
                raise _too_large(self._provider, limit)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)


class _Inflater:
    """Incremental decoding that never produces more than `_STEP` bytes at once. Several gzip members
    one after another are one body (RFC 1952 2.2); a body that ends before its compressed data does
    is refused, never passed on cut short."""

    def __init__(self, wbits: int) -> None:
        self._wbits = wbits
        self._z = zlib.decompressobj(wbits)

    def feed(self, data: bytes, provider: str) -> Iterable[bytes]:
        try:
            while data:
                piece = self._z.decompress(data, _STEP)
                while piece:
                    yield piece
                    piece = self._z.decompress(self._z.unconsumed_tail, _STEP) if self._z.unconsumed_tail else b""
                data = self._z.unused_data if self._z.eof else b""
                if data:  # the next member
                    self._z = zlib.decompressobj(self._wbits)
        except zlib.error as exc:
            raise _undecodable(provider) from exc

    def flush(self, provider: str) -> bytes:
        try:
            tail = self._z.flush()
        except zlib.error as exc:
            raise _undecodable(provider) from exc
        if not self._z.eof:
            raise _undecodable(provider)
        return tail


def _too_large(provider: str, limit: int) -> UpstreamTooLarge:
    return UpstreamTooLarge(f"The provider {provider!r} answered with more than this gateway buffers ({limit} bytes, "
                            "[server] max_response_bytes). Ask for less (or stream the answer), or ask the "
                            "operator to raise the limit.")


def _undecodable(provider: str) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"The provider {provider!r} sent a compressed body that could not be decoded. "
                               "Try again later.")


class Upstream:
    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None))

    async def close(self) -> None:
        if self._session:
            await self._session.close()
            self._session = None

    async def websocket(self, provider: ProviderSettings, url: URL, headers: list[tuple[str, str]],
                        protocols: tuple[str, ...]) -> UpstreamSocket:
        """Open a WebSocket to the provider (the caller closes it). Errors are translated."""
        assert self._session is not None, "Upstream.start() was not awaited"
        return await _ws_connect(self._session, provider, url, headers, protocols)

    @asynccontextmanager
    async def request(self, provider: ProviderSettings, method: str, url: URL,
                      headers: Iterable[tuple[str, str]], body: bytes | None) -> AsyncIterator[UpstreamResponse]:
        """Send one request; yield the response with its headers read. Errors are translated."""
        assert self._session is not None, "Upstream.start() was not awaited"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=provider.connect_timeout_s,
                                        sock_read=provider.read_timeout_s)
        try:
            async with self._session.request(method, url, headers=[*headers, ("Accept-Encoding", "identity")],
                                             data=body, timeout=timeout, allow_redirects=False) as response:
                yield UpstreamResponse(response, provider.name)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(f"The provider {provider.name!r} did not answer in time. Try again; "
                                  f"if it persists, check its status or raise read_timeout_s.") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnreachable(f"The provider {provider.name!r} could not be reached "
                                      f"({type(exc).__name__}). Try again later.") from exc


class UpstreamSocket:
    """An open WebSocket to a provider: text frames as `str`, binary as `bytes`, `None` once closed."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self.protocol: str | None = ws.protocol  # the subprotocol the provider chose
        response = getattr(ws, "_response", None)  # the handshake's answer (aiohttp keeps it, unexported)
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = tuple(response.raw_headers) if response else ()

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    async def receive(self) -> str | bytes | None:
        """The next data frame (pings are answered here), or None when the socket is closed."""
        while True:
            message = await self._ws.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                return message.data
            if message.type is aiohttp.WSMsgType.BINARY:
                return message.data
            if message.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue
            return None  # CLOSE, CLOSING, CLOSED or ERROR

    async def send(self, data: str | bytes) -> bool:
        """Send one frame; False when the socket is already closed."""
        try:
            if isinstance(data, str):
                await self._ws.send_str(data)
            else:
                await self._ws.send_bytes(data)
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            return False
        return True

    async def close(self, code: int = 1000, reason: str = "") -> None:
        with suppress(aiohttp.ClientError, ConnectionError, TimeoutError):
            await self._ws.close(code=code, message=reason.encode()[:123])


async def _ws_connect(session: aiohttp.ClientSession, provider: ProviderSettings, url: URL,
                      headers: list[tuple[str, str]], protocols: tuple[str, ...]) -> UpstreamSocket:
    try:
        async with asyncio.timeout(provider.connect_timeout_s + provider.read_timeout_s):
            ws = await session.ws_connect(url, headers=headers, protocols=protocols, autoping=True,
                                          max_msg_size=WS_MAX_MESSAGE,
                                          timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0))
    except aiohttp.WSServerHandshakeError as exc:
        retry_after = exc.headers.get("retry-after") if exc.headers else None
        raise UpstreamRefused(f"The provider {provider.name!r} refused the WebSocket with status {exc.status}.",
                              exc.status or 502, retry_after) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise UpstreamTimeout(f"The provider {provider.name!r} did not accept the WebSocket in time. "
                              "Try again; if it persists, check its status.") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(f"The provider {provider.name!r} could not be reached "
                                  f"({type(exc).__name__}). Try again later.") from exc
    return UpstreamSocket(ws)
