"""One incremental Server-Sent Events parser for every provider.

Fed raw bytes exactly as they arrive (any split), it returns only complete events, each with its
raw bytes (so a caller can pass it on untouched), its `event:` name and its joined `data:`.
`data:` is read with or without the space after the colon; `\\n`, `\\r\\n` and `\\r\\n\\r\\n`
framing all work; comment lines (`: ping`) and unknown fields are kept in `raw` but ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")


@dataclass(frozen=True, slots=True)
class SseEvent:
    raw: bytes  # the event's bytes including its blank-line terminator
    event: str | None
    data: bytes


class SseParser:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add bytes; return the events they complete, in order."""
        buffer = self._buffer + chunk if self._buffer else chunk
        events = []
        start = 0
        for match in _BOUNDARY.finditer(buffer):
            events.append(parse_event(buffer[start:match.end()]))
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def pending(self) -> bytes:
        """Bytes of an event that has not been completed (yet)."""
        return self._buffer

    def close(self) -> list[SseEvent]:
        """End of stream: a final event without its blank line still counts."""
        rest, self._buffer = self._buffer, b""
        return [parse_event(rest)] if rest.strip() else []


def parse_event(raw: bytes) -> SseEvent:
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
