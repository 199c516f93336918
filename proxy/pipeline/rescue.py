"""Sealing a spool copied from a machine that will not come back (`tollway pipeline seal-spool DIR`).

A gateway process writes each answered event ahead to `DATA_DIR/spool/` and seals it into a segment
within `flush_interval_ms`; a process killed meanwhile leaves the unsealed events in its spool files,
and the next process on that machine seals them at start. When the machine itself is lost but its
disk can be read (a cloud volume attached elsewhere, a backup), its spool files are copied to any
machine of the deployment and sealed here, into the deployment's own segment store, exactly as a
restart would: the files' locks say no live process holds them, each file goes once its rows are
sealed, and an event sealed before the loss is sealed again harmlessly (the pipeline skips an
`event_id` it already holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proxy.settings import Settings
from proxy.sinks.segment_store import segment_store_for
from proxy.sinks.segments import SegmentSink
from proxy.sinks.spool import SUFFIX

_RETRY_MS = 1000  # the sink's writer thread retries this often: close() waits at most that long for it


@dataclass(frozen=True)
class Rescue:
    files: int  # spool files found
    events: int  # events sealed from them
    segments: int  # segments written
    location: str  # where they were sealed
    left: tuple[str, ...]  # files still there: held by a live process, unreadable, or not sealed
    error: str | None  # why the events could not be sealed (the files are kept), else None


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"*{SUFFIX}"))


def seal_copied_spool(settings: Settings, directory: Path) -> Rescue:
    """Seal every spool file in `directory` that no live process holds into the deployment's segments."""
    found = spool_files(directory)
    store = segment_store_for(settings.events, settings.data_dir)
    sink = SegmentSink(store, spool_dir=directory, flush_interval_ms=_RETRY_MS, batch_size=settings.events.batch_size,
                       max_buffered=10**12, fail_closed=False,  # adopts every free file and seals it now
                       rejected_path=settings.data_dir / "rejected-events.jsonl")
    sink.close()  # one more try for anything a failing store kept; keeps the files of what is still unsealed
    error = (sink.last_error or "the segment store refused them") if sink.queue_depth else None
    left = tuple(p.name for p in spool_files(directory))
    return Rescue(len(found), sink.written, sink.sealed, store.location, left, error)
