"""Batched event writer: the request path appends to memory, a thread appends to DuckDB.

`record()` costs a deque append. The writer thread wakes every `flush_interval_ms` (or when a
batch is full) and appends everything pending in one DuckDB appender flush, so a crash loses at
most one interval of events; `close()` writes whatever is left.

When the store cannot be written (disk full, file locked: an I/O error) the rows stay queued and
are retried every interval; `accepting` turns false once `max_buffered` rows wait, and the gateway
then refuses new requests (fail closed) until a write succeeds again. With `fail_closed = false`
the oldest rows are dropped beyond the bound instead, and counted. A row DuckDB itself refuses
(not an I/O problem) cannot succeed on retry: the batch is written row by row and each refused row
is set aside in `rejected-events.jsonl` next to the database, with the reason, so one bad row
never blocks the rest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from proxy.events import COLUMNS, CREATE_TABLE, Event, missing_columns

if TYPE_CHECKING:
    from proxy.sinks.spool import EventSpool

log = logging.getLogger("tollway.recorder")
#: Nothing is ever downloaded: the extensions Tollway needs are built in.
DUCKDB_CONFIG = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
#: Errors that are about a row's values: retrying cannot help, the row is set aside. Anything else
#: (I/O errors, failed commits, a full disk) is the store's and is retried with every row kept.
ROW_ERRORS = (duckdb.DataError, duckdb.IntegrityError, duckdb.ProgrammingError, TypeError, ValueError)


def open_events_db(path: Path, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    """Open (and create if needed) `events.duckdb` with its `events` table; nothing is downloaded.
    `memory_limit` caps DuckDB's buffer pool (it spills to disk beyond it), e.g. "256MB"."""
    config = dict(DUCKDB_CONFIG)
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(str(path), config=config)
    con.execute(CREATE_TABLE)
    upgrade_columns(con)
    return con


def upgrade_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Add the columns a newer Tollway records to an older `events` table, in place: every row is kept
    (new columns are NULL in old rows). Returns the columns added."""
    existing = [row[0] for row in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'events' "
        "AND table_schema = current_schema() ORDER BY ordinal_position").fetchall()]
    statements = missing_columns(existing)
    for statement in statements:
        con.execute(statement)
    if statements:
        log.info("events.duckdb upgraded in place: %s", ", ".join(s.split()[-2] for s in statements))
    return [s.split()[-2] for s in statements]


class EventRecorder:
    def __init__(self, con: duckdb.DuckDBPyConnection, *, flush_interval_ms: int = 500, batch_size: int = 5000,
                 max_buffered: int = 100_000, fail_closed: bool = True, rejected_path: Path | None = None,
                 spool: EventSpool | None = None) -> None:
        self._con = con
        self._spool = spool  # rows also written ahead to a local file (the segment sink's)
        self._interval = flush_interval_ms / 1000
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        self._fail_closed = fail_closed
        self._rejected_path = rejected_path
        self._pending: deque[tuple] = deque()
        self._kept = False  # the last write put rows back
        self._in_flight = 0  # rows taken from the queue by a write that has not ended yet
        self._wake = threading.Event()
        self._stop = False
        self._lock = threading.Lock()  # one flush at a time (writer thread, close, explicit flush)
        self.written = 0
        self.dropped = 0  # only with fail_closed = false, beyond the bound
        self.rejected = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="tollway-event-writer", daemon=True)
        self._thread.start()

    def record(self, event: Event) -> None:
        if self._spool is None:
            self._pending.append(event.row())
        else:
            self._spool.append(event.row(), self._pending)
        depth = len(self._pending)
        if depth >= self._batch_size:
            self._wake.set()
        if depth > self._max_buffered and not self._fail_closed:
            self._pending.popleft()
            self.dropped += 1

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def accepting(self) -> bool:
        """False while the store is failing and the buffer is full: new requests must be refused. Rows a
        write has taken but not yet stored count too (a failing write puts them back)."""
        return not self._fail_closed or len(self._pending) + self._in_flight < self._max_buffered

    def flush(self) -> int:
        """Write everything pending now; return how many rows were written."""
        with self._lock:
            batch = self._take()
            before = self.written
            if not batch:
                return 0
            self._kept = False
            try:
                self._append(batch)
            except ROW_ERRORS:  # a row DuckDB refuses: find it, set it aside, keep the rest
                self._write_one_by_one(batch)
            except Exception as exc:  # the store is unavailable: keep the rows for the next try
                self._keep(batch, exc)
            else:
                self.written += len(batch)
                self.last_error = None
            finally:
                self._in_flight = 0
            if self._spool is not None and not self._kept:
                self._spool.sealed()
            return self.written - before

    def _take(self) -> list[tuple]:
        if self._spool is not None:
            return self._spool.take(self._pending, self._count_in_flight)
        self._count_in_flight(len(self._pending))
        return [self._pending.popleft() for _ in range(self._in_flight)]

    def _count_in_flight(self, count: int) -> None:
        self._in_flight = count  # set before the rows leave the queue: never uncounted

    def _append(self, rows: list[tuple]) -> None:
        cursor = self._con.cursor()
        try:
            appender = cursor.appender("events")
            appender.append_rows(rows)
            appender.flush()
        finally:
            cursor.close()

    def _write_one_by_one(self, batch: list[tuple]) -> None:
        for index, row in enumerate(batch):
            try:
                self._append([row])
            except ROW_ERRORS as exc:
                self._reject(row, exc)
            except Exception as exc:
                self._keep(batch[index:], exc)
                return
            else:
                self.written += 1
        self.last_error = None

    def _keep(self, rows: list[tuple], exc: Exception) -> None:
        """Put unwritten rows back at the head of the queue and report the store as failing."""
        self._pending.extendleft(reversed(rows))
        self._kept = True
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("event store cannot be written, %d events kept in memory (bound %d): %s", len(rows),
                  self._max_buffered, self.last_error)

    def _reject(self, row: tuple, exc: Exception) -> None:
        self.rejected += 1
        log.error("event %s refused by the store and set aside: %s", row[0], exc)
        if self._rejected_path is None:
            return
        record = {name: (value if isinstance(value, int | float | bool | None) else str(value))
                  for (name, _), value in zip(COLUMNS, row, strict=True)}
        try:
            with self._rejected_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}", "event": record}) + "\n")
        except OSError as error:
            log.error("could not set event %s aside in %s: %s", row[0], self._rejected_path, error)

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
                try:
                    self.flush()
                except Exception:  # never let the writer die: the rows are still queued
                    log.exception("event writer error; retrying")
            if self.last_error:  # do not spin on a failing store
                time.sleep(max(0.0, self._interval - (time.monotonic() - started)))
