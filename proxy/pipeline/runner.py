"""The pipeline process: ingest on an interval, the report schedule and retention, one at a time.

It holds `events.duckdb` only while a step needs it (an ingest, a report snapshot, retention), so
readers (`tollway report run`, `tollway pricing`, a gateway seeding its memory counters) can open
it read-only between steps; a step that finds it held by a reader waits for it. One pipeline per
deployment: `pipeline.lock` in the deployment directory (an exclusive flock) says which process runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from analytics.jobs import (
    apply_retention,
    build_reports,
    build_snapshot_in_child,
    load_billing_inputs,
    snapshot_events,
)
from analytics.scheduler import ReportSchedule
from proxy.errors import StartupError
from proxy.pipeline.ingest import BATCH_SEGMENTS, IngestResult, ingest, prune_ledger
from proxy.process_lock import ProcessLock
from proxy.recorder import open_events_db
from proxy.settings import Settings
from proxy.sinks.segment_store import INGESTED, segment_store_for

log = logging.getLogger("tollway.pipeline")
LOCK_FILE = "pipeline.lock"
OPEN_WAIT_S = 30.0
PROGRESS_EVERY_S = 2.0


class PipelineLock(ProcessLock):
    """`DIR/pipeline.lock`, held for the pipeline's lifetime."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir / LOCK_FILE)


class Pipeline:
    def __init__(self, settings: Settings, batch: int = BATCH_SEGMENTS) -> None:
        self.settings = settings
        self.batch = batch
        try:
            self.store = segment_store_for(settings.events, settings.data_dir)
        except ValueError as exc:  # a URL obstore cannot use
            raise StartupError(str(exc)) from exc
        self._db = threading.Lock()  # one step at a time holds events.duckdb
        self._last_progress = 0.0

    @contextlib.contextmanager
    def database(self, wait_s: float = OPEN_WAIT_S) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._db:
            con = _open_waiting(self.settings.events_db, wait_s)
            try:
                yield con
            finally:
                con.close()

    def ingest_once(self) -> IngestResult:
        with self.database() as con:
            result = ingest(con, self.store, self.batch, self._progress)
        if result.segments or result.moved_only or result.rejected:
            log.info("ingested %d segment(s): %d events, %d new, %d already present (%.0f events/s)%s",
                     result.segments, result.events, result.inserted, result.duplicates,
                     result.events / result.seconds if result.seconds else 0,
                     f"; {result.rejected} unreadable set aside" if result.rejected else "")
        return result

    def _progress(self, result: IngestResult) -> None:
        if time.monotonic() - self._last_progress < PROGRESS_EVERY_S or result.segments >= result.waiting:
            return
        self._last_progress = time.monotonic()
        log.info("ingesting: %d of %d segments, %d events so far (%.0f events/s)", result.segments,
                 result.waiting, result.events, result.events / result.seconds if result.seconds else 0)

    def build_reports(self) -> dict:
        """The scheduled job: ingest what is waiting, snapshot, build in a child (events.duckdb is
        free meanwhile), then retention of events and of ingested segments."""
        self.ingest_once()
        with self.database() as con:
            snapshot = snapshot_events(con, self.settings.reports_dir)
        manifest = build_snapshot_in_child(snapshot, self.settings.data_dir, self.settings.reports_dir)
        self.retention()
        return manifest

    def build_direct(self) -> dict:
        """`tollway report run` without a running pipeline: ingest, then build in this process."""
        self.ingest_once()
        with self.database() as con:
            return build_reports(con, self.settings.reports_dir, load_billing_inputs(self.settings.data_dir))

    def retention(self) -> None:
        days = self.settings.pipeline.retention_days
        closed = {period for period, _ in load_billing_inputs(self.settings.data_dir).closed}
        with self.database() as con:
            deleted = apply_retention(con, days, closed, datetime.now(UTC))
            prune_ledger(con, days)
        if deleted:
            log.info("retention: deleted %d events older than %d days from closed periods", deleted, days)
        try:
            self.store.delete_before(INGESTED, datetime.now(UTC) - timedelta(days=days))
        except Exception as exc:  # object storage unreachable: the next run deletes them
            log.warning("retention: could not delete old ingested segments in %s: %s", self.store.location, exc)

    async def serve(self, interval_s: float) -> None:
        """Until SIGTERM or SIGINT: ingest every `interval_s`, reports every `report_interval_s`
        (and when `tollway report run` asks). The step under way finishes before the process ends."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        schedule = ReportSchedule(self.build_reports, self.settings.reports_dir,
                                  self.settings.pipeline.report_interval_s)
        schedule.start()
        log.info("pipeline: ingesting %s every %.1f s into %s; reports every %d s", self.store.location, interval_s,
                 self.settings.events_db, self.settings.pipeline.report_interval_s)
        try:
            while not stop.is_set():
                try:
                    await asyncio.to_thread(self.ingest_once)
                except Exception:
                    log.exception("ingest failed; the segments stay and the next run tries again")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval_s)
        finally:
            schedule.stop()
            await asyncio.to_thread(self._db.acquire)  # a report build under way finishes first
            self._db.release()
        log.info("pipeline stopped")


def _open_waiting(path: Path, wait_s: float) -> duckdb.DuckDBPyConnection:
    """`open_events_db`, waiting while a reader holds the file."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return open_events_db(path)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
