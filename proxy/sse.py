"""One incremental Server-Sent Events parser for every provider.

Fed raw bytes exactly as they arrive (any split), it returns only complete events, each with its
raw bytes (so a caller can pass it on untouched), its `event:` name and its joined `data:`.
`data:` is read with or without the space after the colon; `\\n`, `\\r\\n` and `\\r\\n\\r\\n`
framing all work; comment lines (`: ping`) and unknown fields are kept in `raw` but ignored.
An event longer than the parser's cap is returned as `unread` pieces (see `SseParser`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_OVERLAP = 3  # a boundary is at most 4 bytes: the last 3 of a search may begin one that ends later
DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SseEvent:
    raw: bytes  # the event's bytes including its blank-line terminator
    event: str | None
    data: bytes
    unread: bool = False  # a piece of an event longer than the cap: to pass on, not to interpret


class SseParser:
    """Linear in the stream's length, whatever its framing: each byte is searched for a boundary
    once (plus a 3-byte overlap), and at most `max_event_bytes` of an unfinished event are held.
    Beyond that the event is handed back in `unread` pieces until its boundary, then parsing
    resumes: a provider sending 50 MB without a blank line costs 50 MB of pass-through, not memory."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._buffer = bytearray()
        self._searched = 0  # bytes at the buffer's start known to hold no boundary (but for the overlap)
        self._max = max_event_bytes
        self._oversized = False  # inside an event past the cap

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events they complete, in order."""
        if not self._buffer and not self._oversized and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            # The common case: whole `\n\n`-framed events, nothing held from before. `split` finds the same
            # boundaries as the search below (left to right, not overlapping), without copying into the buffer.
            parts = chunk.split(b"\n\n")
            if not parts[-1]:  # (a chunk ending in three newlines ends with one held for the next event)
                if len(parts) == 2:
                    return [parse_event(chunk)]
                return [parse_event(part + b"\n\n") for part in parts[:-1]]
        buffer = self._buffer
        buffer += chunk
        events, start = [], 0
        with memoryview(buffer) as view:  # one copy per event (a bytearray slice would be a second)
            for match in _BOUNDARY.finditer(buffer, max(self._searched - _OVERLAP, 0)):
                raw = bytes(view[start:match.end()])
                events.append(SseEvent(raw, None, b"", True) if self._oversized else parse_event(raw))
                self._oversized, start = False, match.end()
            piece = bytes(view[start:-_OVERLAP]) if len(buffer) - start > self._max else None
        del buffer[:start]
        if piece is not None:  # past the cap: pass it on unread, keep the overlap (a boundary may start in it)
            events.append(SseEvent(piece, None, b"", True))
            del buffer[:-_OVERLAP]
            self._oversized = True
        self._searched = len(buffer)
        return events

    def pending(self) -> bytes:
        """Bytes of an event that has not been completed (yet)."""
        return bytes(self._buffer)

    def close(self) -> list[SseEvent]:
        """End of stream: a final event without its blank line still counts."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        self._searched = 0
        if self._oversized:
            self._oversized = False
            return [SseEvent(rest, None, b"", True)] if rest else []
        return [parse_event(rest)] if rest.strip() else []


def parse_event(raw: bytes) -> SseEvent:
    if raw.startswith(b"data: ") and raw.find(b"\n", 6) == len(raw) - 2 and raw.endswith(b"\n") and b"\r" not in raw:
        return SseEvent(raw, None, raw[6:-2])  # one `data: ` line and its blank line: most events of every provider
    name: str | None = None
    data: list[bytes] = []
    for line in raw.splitlines():
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            data.append(value)
        elif field == b"event":
            name = value.decode("utf-8", "replace")
    return SseEvent(raw, name, b"\n".join(data))
