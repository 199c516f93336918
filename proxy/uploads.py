"""Request bodies that are not JSON (multipart uploads, audio, file bytes): streamed, never held whole.

Only the first `HEAD_BYTES` are held, to read form fields such as `model` (the official SDKs send
fields before the file); the rest goes to the provider as it arrives, so a 500 MB upload costs the
gateway a few chunks of memory. `[server] max_upload_bytes` caps the body; a client silent for
longer than `[server] body_timeout_s` between two chunks is cut off.

    >>> form_field(b'--b\\r\\nContent-Disposition: form-data; name="model"\\r\\n\\r\\nwhisper-1\\r\\n--b', 'b', 'model')
    'whisper-1'
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable

from proxy.errors import BodyTimeout, BodyTooLarge, TollwayError

HEAD_BYTES = 64 * 1024
_NAME = re.compile(rb'content-disposition:[^\r\n]*?;\s*name="([^"]*)"', re.IGNORECASE)
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


class ClientGone(Exception):
    """The client went away while its body was being streamed."""


def is_streamed(content_type: str | None) -> bool:
    """Whether a request body goes through unbuffered: anything but JSON (and no body at all)."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return bool(media) and media != "application/json" and not media.endswith("+json")


def boundary_of(content_type: str) -> str | None:
    match = _BOUNDARY.search(content_type) if content_type.lower().startswith("multipart/") else None
    return match.group(1) if match else None


def form_field(head: bytes, boundary: str, name: str) -> str | None:
    """A text field of a multipart body, if it is complete within `head` and names no file."""
    delimiter = b"--" + boundary.encode("latin-1")
    parts = head.split(delimiter)
    for part in parts[1:-1]:  # the last piece may be cut short: only parts closed by a delimiter
        headers, sep, value = part.partition(b"\r\n\r\n")
        match = _NAME.search(headers)
        if sep and match and match.group(1).decode("utf-8", "replace") == name and b"filename=" not in headers:
            return value.removesuffix(b"\r\n").decode("utf-8", "replace").strip() or None
    return None


class UploadBody:
    """The body of one request: `head` read already, the rest read from the ASGI `receive` on demand.

    Iterated once, by the upstream client. A refusal while streaming (too large, too slow) is kept in
    `error`, because the upstream client reports it only as a failed send."""

    def __init__(self, receive, head: bytes, more: bool, size: int, limit: int, timeout_s: float,
                 on_end: Callable[[], None], too_large: str) -> None:
        self.head, self._more, self._size = head, more, size
        self._receive, self._limit, self._timeout_s = receive, limit, timeout_s
        self.on_end, self._too_large = on_end, too_large  # called once the whole body was read
        self.error: TollwayError | ClientGone | None = None
        self.started = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        self.started = True
        if self.head:
            yield self.head
        while self._more:
            chunk, self._more = await self._next()
            if chunk:
                yield chunk
        self.on_end()

    async def _next(self) -> tuple[bytes, bool]:
        try:
            chunk, more = await receive_chunk(self._receive, self._timeout_s)
        except (ClientGone, BodyTimeout) as exc:
            self.error = exc
            raise
        self._size += len(chunk)
        if self._size > self._limit:
            self.error = BodyTooLarge(self._too_large)
            raise self.error
        return chunk, more


async def receive_chunk(receive, timeout_s: float) -> tuple[bytes, bool]:
    """One piece of the body and whether more follows."""
    try:
        async with asyncio.timeout(timeout_s):
            message = await receive()
    except TimeoutError as exc:
        raise BodyTimeout(f"The request body stalled for more than {timeout_s:g} s; send it without pauses "
                          "(the gateway's [server] body_timeout_s).") from exc
    if message["type"] == "http.disconnect":
        raise ClientGone
    return message.get("body", b""), bool(message.get("more_body"))


async def read_head(receive, limit: int, timeout_s: float, too_large: str) -> tuple[bytes, bool]:
    """At least `HEAD_BYTES` of the body (or all of it, when shorter), and whether more follows."""
    parts, size, more = [], 0, True
    while more and size < HEAD_BYTES:
        chunk, more = await receive_chunk(receive, timeout_s)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(too_large)
        parts.append(chunk)
    return b"".join(parts), more
