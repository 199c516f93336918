"""The gateway's side of the segment sink, and the history it seeds memory limit counters from.

With sink = "segments" the gateway never opens `events.duckdb` for writing and runs no report
schedule or retention (the pipeline does). Limit counters: the Redis store keeps them in Redis; the
memory store (one gateway process) is seeded at start from every event recorded so far, which is
`events.duckdb` (opened read-only: the pipeline holds it only while it ingests or takes a report
snapshot, so start-up waits up to `HISTORY_WAIT_S` for it) plus the sealed segments not yet
ingested (by name: a segment already in the pipeline's ledger is not counted twice), fetched from
object storage when segments live there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb

from proxy.errors import StartupError
from proxy.events import CREATE_TABLE
from proxy.recorder import DUCKDB_CONFIG
from proxy.settings import Settings
from proxy.sinks.segment_store import SegmentStore, segment_store_for, sql_path
from proxy.sinks.segments import SegmentSink

log = logging.getLogger("tollway.gateway")
HISTORY_WAIT_S = 60.0
LEDGER = "ingested_segments"


class SegmentEvents:
    name = "segments"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        try:
            self.store = segment_store_for(settings.events, settings.data_dir)
        except ValueError as exc:
            raise StartupError(str(exc)) from exc
        self.sink: SegmentSink | None = None

    def open(self) -> SegmentSink:
        events = self._settings.events
        self.sink = SegmentSink(self.store, flush_interval_ms=events.flush_interval_ms,
                                batch_size=events.batch_size, max_buffered=events.max_buffered,
                                fail_closed=events.fail_closed,
                                rejected_path=self._settings.data_dir / "rejected-events.jsonl",
                                spool_dir=self._settings.data_dir / "spool" if events.spool else None)
        log.info("events: sealed segments in %s every %d ms (`tollway pipeline` ingests them)", self.store.location,
                 events.flush_interval_ms)
        return self.sink

    def history(self) -> contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]:
        return event_history(self._settings.events_db, self.store)

    async def check(self) -> str:
        return await self.store.check()

    def report_builder(self) -> None:
        return None  # the pipeline's

    def close(self) -> None:
        pass


@contextlib.contextmanager
def event_history(events_db: Path, segments: SegmentStore, wait_s: float = HISTORY_WAIT_S
                  ) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory connection whose `events` is events.duckdb's events plus the pending segments'."""
    con = duckdb.connect(":memory:", config=DUCKDB_CONFIG)
    try:
        parts = []
        if events_db.exists():
            attach_read_only(con, events_db, wait_s)
            parts.append("SELECT * FROM history.events")
        if load_pending(con, segments, _ledger(con) if parts else set()):
            parts.append("SELECT * FROM pending")
        if parts:
            con.execute("CREATE VIEW events AS " + " UNION ALL BY NAME ".join(parts))
        else:
            con.execute(CREATE_TABLE)
        yield con
    finally:
        con.close()


def attach_read_only(con: duckdb.DuckDBPyConnection, events_db: Path, wait_s: float) -> None:
    """Attach `events_db` read-only as `history`, waiting while the pipeline holds it."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            con.execute(f"ATTACH {sql_path(events_db)} AS history (READ_ONLY)")
            return
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise StartupError(f"cannot read {events_db} to seed the limit counters: {exc}") from exc
            if time.monotonic() >= deadline:
                raise StartupError(f"{events_db} stayed locked for {wait_s:.0f} s ({exc}); the pipeline holds it "
                                   "only while it ingests: check `tollway pipeline`, then start again") from exc
            time.sleep(0.2)


def _ledger(con: duckdb.DuckDBPyConnection) -> set[str]:
    found = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'history' "
                        "AND table_name = ?", [LEDGER]).fetchone()[0]
    return {row[0] for row in con.execute(f"SELECT name FROM history.{LEDGER}").fetchall()} if found else set()


def load_pending(con: duckdb.DuckDBPyConnection, segments: SegmentStore, ingested: set[str], tries: int = 5) -> bool:
    """Copy the sealed segments not in the ledger into the table `pending`; False when there are none.
    A segment the pipeline moves away meanwhile (it was ingested: the history has it) is re-listed."""
    for attempt in range(tries):
        names = [name for name in segments.list_sealed() if name not in ingested]
        if not names:
            return False
        try:
            with segments.local_copies(names) as paths:
                con.execute("CREATE OR REPLACE TABLE pending AS SELECT * FROM read_parquet("
                            f"[{', '.join(sql_path(p) for p in paths.values())}], union_by_name = true)")
            return True
        except (duckdb.IOException, FileNotFoundError):
            if attempt == tries - 1:
                raise
    return False
