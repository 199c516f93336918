"""`[events] sink = "duckdb"`: the gateway appends to `events.duckdb` itself (one process) and runs
the report schedule and retention on its own connection."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import duckdb

from analytics.jobs import build_and_retain
from proxy.recorder import EventRecorder, open_events_db
from proxy.settings import Settings


class DuckDBEvents:
    name = "duckdb"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._con: duckdb.DuckDBPyConnection | None = None
        self.sink: EventRecorder | None = None

    def open(self) -> EventRecorder:
        # The gateway's DuckDB only appends, counts and streams snapshots: a small buffer pool (it
        # spills to disk beyond it) keeps its memory flat however large the file grows. The soak
        # measured +48 % RSS over 10 minutes with 256 MB, +4 % with 64 MB.
        self._con = open_events_db(self._settings.events_db, memory_limit="64MB")
        events = self._settings.events
        self.sink = EventRecorder(self._con, flush_interval_ms=events.flush_interval_ms,
                                  batch_size=events.batch_size, max_buffered=events.max_buffered,
                                  fail_closed=events.fail_closed,
                                  rejected_path=self._settings.data_dir / "rejected-events.jsonl")
        return self.sink

    @contextlib.contextmanager
    def history(self) -> Iterator[duckdb.DuckDBPyConnection]:
        yield self._con

    async def check(self) -> str:
        return "ok"  # the writer's own errors say the rest (recorder.last_error)

    def report_builder(self) -> Callable[[], dict]:
        return self._build_reports

    def _build_reports(self) -> dict:
        """Flush pending events, then the scheduled job on a cursor of our own connection."""
        self.sink.flush()
        cursor = self._con.cursor()
        try:
            return build_and_retain(cursor, self._settings.data_dir, self._settings.reports_dir,
                                    self._settings.pipeline.retention_days)
        finally:
            cursor.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
