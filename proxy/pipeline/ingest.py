"""Ingest sealed segments into `events.duckdb`: nothing lost, nothing doubled, whatever is killed when.

Segments come from a `SegmentStore` (a directory, or object storage: fetched concurrently into a
temporary directory, a batch at a time, while the previous batch is inserted and the one before it
moves under `ingested/`).

Per batch of segments, one transaction: insert the segments' events whose `event_id` the table does
not hold yet, and record each segment's name in the ledger (`ingested_segments`); only after the
commit are the files moved to `ingested/`. A kill before the commit leaves no trace (DuckDB rolls
the transaction back): the segments are still waiting and are ingested again. A kill between the
commit and the moves leaves segments that the ledger names: they are moved, not ingested again. An
event already present (a segment copied back by hand, a seal retried after its rename) is skipped
by its `event_id`. A segment that cannot be read on its own is moved to `rejected/`, with a log line.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import duckdb

from proxy.events import COLUMNS
from proxy.sinks.segment_events import LEDGER
from proxy.sinks.segment_store import INGESTED, REJECTED, LocalSegments, SegmentStore, sql_path

log = logging.getLogger("tollway.pipeline")
CREATE_LEDGER = (f"CREATE TABLE IF NOT EXISTS {LEDGER} (name VARCHAR PRIMARY KEY, events BIGINT NOT NULL, "
                 "ingested_at TIMESTAMPTZ NOT NULL DEFAULT now())")
BATCH_SEGMENTS = 256


@dataclass
class IngestResult:
    segments: int = 0  # ingested now
    events: int = 0  # read from them
    inserted: int = 0  # new to events.duckdb (events - inserted were already there)
    moved_only: int = 0  # already in the ledger (a run killed after its commit)
    rejected: int = 0  # unreadable segments set aside
    waiting: int = 0  # segments found at the start
    seconds: float = 0.0

    @property
    def duplicates(self) -> int:
        return self.events - self.inserted

    def as_json(self) -> dict:
        return {"segments": self.segments, "events": self.events, "inserted": self.inserted,
                "duplicates_skipped": self.duplicates, "moved_only": self.moved_only, "rejected": self.rejected,
                "seconds": round(self.seconds, 3)}


def ingest(con: duckdb.DuckDBPyConnection, segments: SegmentStore | Path, batch: int = BATCH_SEGMENTS,
           progress: Callable[[IngestResult], None] | None = None) -> IngestResult:
    """Ingest every sealed segment waiting in `segments` (a store, or a directory) into `con`'s `events`."""
    store = LocalSegments(segments) if isinstance(segments, Path) else segments
    started = time.perf_counter()
    con.execute(CREATE_LEDGER)
    pending = store.list_sealed()
    result = IngestResult(waiting=len(pending))
    done = in_ledger(con, pending)
    if done:
        store.move(sorted(done), INGESTED)
        result.moved_only += len(done)
    todo = [name for name in pending if name not in done]
    batches = [todo[start:start + batch] for start in range(0, len(todo), batch)]
    # Three things at once: batch N is inserted while batch N+1 downloads and batch N-1's segments
    # move under ingested/ (object storage: requests that wait on the network, not on this CPU).
    with ThreadPoolExecutor(1, thread_name_prefix="tollway-fetch") as prefetch, \
            ThreadPoolExecutor(1, thread_name_prefix="tollway-move") as mover:
        fetching = prefetch.submit(_fetch, store, batches[0]) if batches else None
        moving = None
        try:
            for number, names in enumerate(batches):
                copies, paths = fetching.result()
                fetching = prefetch.submit(_fetch, store, batches[number + 1]) if number + 1 < len(batches) else None
                with copies:
                    ingested = ingest_batch(con, store, names, paths, result)
                if moving is not None:
                    moving.result()  # a move that failed stops the ingest (the ledger knows those segments)
                moving = mover.submit(store.move, ingested, INGESTED) if ingested else None
                result.seconds = time.perf_counter() - started
                if progress is not None:
                    progress(result)
            if moving is not None:
                moving.result()
        finally:
            if fetching is not None:  # an ingest that failed: the prefetched copies go too
                with contextlib.suppress(BaseException):
                    fetching.result()[0].close()
    result.seconds = time.perf_counter() - started
    return result


def _fetch(store: SegmentStore, names: list[str]) -> tuple[ExitStack, dict[str, Path]]:
    """Local files of `names`, and what removes them (temporary copies of objects) when closed."""
    copies = ExitStack()
    try:
        return copies, copies.enter_context(store.local_copies(names))
    except BaseException:
        copies.close()
        raise


def in_ledger(con: duckdb.DuckDBPyConnection, names: list[str]) -> set[str]:
    if not names:
        return set()
    return {row[0] for row in con.execute(f"SELECT name FROM {LEDGER} WHERE name IN (SELECT unnest(?))",
                                          [names]).fetchall()}


def ingest_batch(con: duckdb.DuckDBPyConnection, store: SegmentStore, names: list[str], paths: dict[str, Path],
                 result: IngestResult) -> list[str]:
    """One transaction for `names` (a failing batch is retried segment by segment); returns the segments
    ingested, for the caller to move under ingested/ (an unreadable one is moved to rejected/ here)."""
    try:
        events, inserted = insert_segments(con, [paths[name] for name in names])
    except duckdb.Error as exc:
        if len(names) > 1:
            return [done for name in names for done in ingest_batch(con, store, [name], paths, result)]
        if readable(con, paths[names[0]]):
            raise  # the segment is fine: the database is the problem (retried on the next run)
        log.error("segment %s cannot be read, moved to %s/: %s", names[0], REJECTED, exc)
        store.move(names, REJECTED)
        result.rejected += 1
        return []
    result.segments += len(names)
    result.events += events
    result.inserted += inserted
    return names


def insert_segments(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> tuple[int, int]:
    """Insert the events of `paths` not yet present and record the segments (by file name); returns
    (read, inserted)."""
    files = "[" + ", ".join(sql_path(p) for p in paths) + "]"
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE incoming AS SELECT * FROM "
                    f"read_parquet({files}, filename = true, union_by_name = true)")
        present = {row[0] for row in con.execute("DESCRIBE incoming").fetchall()}
        names = [name for name, _ in COLUMNS]
        select = ", ".join(f"i.{n}" if n in present else f"NULL AS {n}" for n in names)
        low, high, read = con.execute("SELECT min(ts), max(ts), count(*) FROM incoming").fetchone()
        # A duplicate is the same event, with the same ts: only events.duckdb's rows in the batch's
        # time range are compared (zone maps skip the rest of the table).
        inserted = con.execute(
            f"INSERT INTO events ({', '.join(names)}) SELECT {select} FROM incoming i "
            "WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.ts BETWEEN ? AND ? AND e.event_id = i.event_id) "
            "QUALIFY row_number() OVER (PARTITION BY i.event_id) = 1", [low, high]).fetchone()[0] if read else 0
        counts = dict(con.execute("SELECT parse_filename(filename), count(*) FROM incoming GROUP BY 1").fetchall())
        # one statement for the batch's ledger rows (executemany costs a statement, ~1 ms, per segment)
        con.execute(f"INSERT INTO {LEDGER} (name, events) SELECT unnest(?), unnest(?)",
                    [[p.name for p in paths], [counts.get(p.name, 0) for p in paths]])
        con.execute("DROP TABLE incoming")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return read, inserted


def prune_ledger(con: duckdb.DuckDBPyConnection, days: int) -> None:
    """Forget segments ingested more than `days` ago (retention deletes their files from `ingested/` by then)."""
    con.execute(CREATE_LEDGER)
    con.execute(f"DELETE FROM {LEDGER} WHERE ingested_at < now() - to_days(?)", [days])


def readable(con: duckdb.DuckDBPyConnection, path: Path) -> bool:
    try:
        con.execute(f"SELECT count(*) FROM read_parquet({sql_path(path)})").fetchone()
        return True
    except duckdb.Error:
        return False
