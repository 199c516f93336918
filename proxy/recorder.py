"""Batched event writer: the request path appends to memory, a thread appends to DuckDB.

`record()` costs a deque append. The writer thread wakes every `flush_interval_ms` (or when a
batch is full) and appends everything pending in one DuckDB appender flush. If a write fails the
rows stay queued and are retried on the next wake-up; `close()` writes whatever is left.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path

import duckdb

from proxy.events import CREATE_TABLE, Event

log = logging.getLogger("tollway.recorder")


def open_events_db(path: Path) -> duckdb.DuckDBPyConnection:
    """Open (and create if needed) `events.duckdb` with its `events` table; nothing is downloaded."""
    con = duckdb.connect(str(path), config={"autoinstall_known_extensions": False,
                                            "autoload_known_extensions": False})
    con.execute(CREATE_TABLE)
    return con


class EventRecorder:
    def __init__(self, con: duckdb.DuckDBPyConnection, *, flush_interval_ms: int = 500,
                 batch_size: int = 5000) -> None:
        self._con = con
        self._interval = flush_interval_ms / 1000
        self._batch_size = batch_size
        self._pending: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one flush at a time (writer thread, close, explicit flush)
        self.written = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="tollway-event-writer", daemon=True)
        self._thread.start()

    def record(self, event: Event) -> None:
        self._pending.append(event.row())
        if len(self._pending) >= self._batch_size:
            self._wake.set()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write everything pending now; return how many rows were written."""
        with self._lock:
            batch = []
            while self._pending:
                batch.append(self._pending.popleft())
            if not batch:
                return 0
            cursor = self._con.cursor()
            try:
                appender = cursor.appender("events")
                appender.append_rows(batch)
                appender.flush()
            except Exception as exc:  # keep the rows: they are retried on the next flush
                self._pending.extendleft(reversed(batch))
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("event write failed, %d events kept for retry: %s", len(batch), self.last_error)
                return 0
            finally:
                cursor.close()
            self.last_error = None
            self.written += len(batch)
            return len(batch)

    def close(self) -> None:
        """Stop the writer and write every buffered event."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self._interval)
            self._wake.clear()
            started = time.monotonic()
            if self._pending:
                self.flush()
            if self.last_error:  # do not spin on a failing store
                time.sleep(max(0.0, self._interval - (time.monotonic() - started)))
