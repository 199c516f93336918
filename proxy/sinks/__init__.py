"""Event sinks: where the gateway's events go, picked by `[events] sink` in `proxy.factory`.

    sink = "duckdb"    ─▶ DuckDBEvents: `events.duckdb`, written by the one gateway process, which
                          also runs the report schedule and retention (the default)
    sink = "segments"  ─▶ SegmentEvents: each process seals Parquet segments into segments_dir;
                          `tollway pipeline` ingests them into `events.duckdb` and runs the reports

Both sinks share the request path's contract (`EventSink`): `record()` is a deque append, a writer
thread does the I/O off the event loop, and `accepting` turns false (fail closed) while the store
cannot be written and the buffer is full.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import duckdb

from proxy.events import Event


class EventSink(Protocol):
    """What the request path and `/metrics` use of an event writer."""

    written: int
    dropped: int
    rejected: int
    last_error: str | None

    def record(self, event: Event) -> None: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def queue_depth(self) -> int: ...

    def flush(self) -> int: ...

    def close(self) -> None: ...


class EventBackend(Protocol):
    """The gateway's side of an event sink: opened in `Gateway.start`, closed in `stop`."""

    name: str

    def open(self) -> EventSink:
        """Open the store and start the writer."""

    def history(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A connection whose `events` relation holds every event recorded so far (to seed limit counters)."""

    async def check(self) -> str:
        """"ok", or why the store cannot take events now, found by asking it (for /readyz)."""

    def report_builder(self) -> Callable[[], dict] | None:
        """The blocking report build (reports, then retention) when the gateway runs the schedule;
        None when another process (the pipeline) does."""

    def close(self) -> None: ...
