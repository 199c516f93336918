"""`[events] sink = "segments"`: each gateway process seals its events into Parquet segments.

The request path appends to the recorder's deque as with the DuckDB sink; the writer thread, every
`flush_interval_ms` (or when `batch_size` events wait), stages the batch in a private in-memory
DuckDB table (so a value the schema refuses is found and set aside exactly as `events.duckdb`
would), then seals it as `<start>-<host>-<pid>-<counter>.parquet` in the segment store
(`proxy.sinks.segment_store`): in a directory, `COPY` to a temporary name, fsync, atomic rename; on
object storage, one PUT of the complete file. A sealed segment is complete and never changes; the
pipeline (`proxy.pipeline`) ingests it. DuckDB's Parquet writer keeps the exact column types
(UUID, TIMESTAMPTZ, DECIMAL(18,9)).

A seal that fails (disk full, directory gone, object store unreachable) keeps the rows queued and
retries every interval (after obstore's own few quick retries with backoff);
`accepting` turns false once `max_buffered` rows wait: the gateway refuses new requests (fail
closed) until a seal succeeds. With a spool (`[events] spool`, the default; `proxy.sinks.spool`)
every row is also written ahead to a local file, so a SIGKILL of the process loses nothing: the next
process to start on the machine seals the rows. Without it a SIGKILL loses the rows not yet sealed:
one interval.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from proxy.events import CREATE_TABLE
from proxy.recorder import DUCKDB_CONFIG, ROW_ERRORS, EventRecorder
from proxy.sinks.segment_store import (  # noqa: F401  (sealed_segments, sql_path: this module's names too)
    INGESTED,
    REJECTED,
    SUFFIX,
    LocalSegments,
    SegmentStore,
    fsync_path,
    safe_error,
    sealed_segments,
    sql_path,
)
from proxy.sinks.spool import EventSpool

log = logging.getLogger("tollway.recorder")


class SegmentWriteError(OSError):
    """A segment could not be sealed: the store's problem (retried), never a row's."""


def segment_prefix() -> str:
    """Unique per process and machine: start time, host name, PID."""
    host = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{host}-{os.getpid()}"


class SegmentSink(EventRecorder):
    """The batched writer of `proxy.recorder`, writing sealed segments instead of appending to DuckDB."""

    def __init__(self, store: SegmentStore | Path, *, spool_dir: Path | None = None, **options) -> None:
        if isinstance(store, Path):
            store.mkdir(parents=True, exist_ok=True)
            store = LocalSegments(store)
        self.store = store
        self.sealed = 0
        self._prefix = segment_prefix()
        self._counter = 0
        self._staging = duckdb.connect(":memory:", config={**DUCKDB_CONFIG, "threads": 1, "memory_limit": "128MB"})
        self._staging.execute(CREATE_TABLE)
        spool = EventSpool(spool_dir, self._prefix) if spool_dir is not None else None
        super().__init__(self._staging, spool=spool, **options)
        if spool is not None and (recovered := spool.adopt()):
            self._pending.extend(recovered)
            self.flush()  # sealed before this process serves (and before limits are seeded from segments)

    def _append(self, rows: list[tuple]) -> None:
        """Stage (DuckDB checks every value: a refused row raises one of ROW_ERRORS), then seal."""
        self._clear()
        super()._append(rows)
        self._seal()

    def _write_one_by_one(self, batch: list[tuple]) -> None:
        """A batch with a refused row: stage row by row, set the refused ones aside, seal the rest once."""
        self._clear()
        staged = []
        for row in batch:
            try:
                super()._append([row])
            except ROW_ERRORS as exc:
                self._reject(row, exc)
            else:
                staged.append(row)
        if staged:
            try:
                self._seal()
            except Exception as exc:
                self._keep(staged, exc)
                return
        self.written += len(staged)
        self.last_error = None

    def _seal(self) -> None:
        self._counter += 1
        name = f"{self._prefix}-{self._counter:08d}{SUFFIX}"
        try:
            self.store.seal(name, self._copy_to)
        except (duckdb.Error, OSError) as exc:
            raise SegmentWriteError(f"cannot seal a segment in {self.store.location}: {safe_error(exc)}") from exc
        finally:
            self._clear()
        self.sealed += 1

    def _copy_to(self, path: Path) -> None:
        self._staging.execute(f"COPY events TO {sql_path(path)} (FORMAT parquet, COMPRESSION zstd)")

    def _clear(self) -> None:
        self._staging.execute("DELETE FROM events")

    def close(self) -> None:
        """Seal every buffered event, then release the staging table."""
        super().close()
        if self.queue_depth and self._spool is not None and self._spool.broken is None:
            log.error("%d events could not be sealed in %s before the process ends; they stay in the spool "
                      "(%s) and are sealed when a gateway starts again here: %s", self.queue_depth,
                      self.store.location, self._spool.directory, self.last_error)
        elif self.queue_depth:  # the store is still failing: nothing else will seal them
            log.error("%d events could not be sealed in %s before the process ends and are lost: %s",
                      self.queue_depth, self.store.location, self.last_error)
        if self._spool is not None:
            self._spool.close(everything_sealed=not self.queue_depth)
        self._staging.close()
