"""Segment ingest from an S3-compatible store against the same segments in a directory (not part of the suite).

    python tests/perf/ingest_s3.py [--quick] [--events N] [--segment-events N]

The segments of `tests/perf/ingest.py` (5,000 events each, as gateways seal them under load) are put
into a bucket of a moto server on loopback (its own process: tests/s3_server.py) and into a local
directory; each is ingested by the pipeline's `ingest` into a fresh `events.duckdb` that already holds
a history, in the same run. Prints events/s for both. moto is a Python server sharing this machine's
cores with the ingest, so the S3 figure is a floor for a real store (whose GETs run elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.pipeline.ingest import ingest  # noqa: E402
from proxy.recorder import open_events_db  # noqa: E402
from proxy.sinks.segment_store import INGESTED, LocalSegments, ObjectSegments  # noqa: E402
from tests.perf import ingest as local_bench  # noqa: E402
from tests.perf.ingest import SYNTHETIC, write_segments  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402


def timed_ingest(root: Path, store, events: int, history: int) -> dict:
    db = open_events_db(root / "events.duckdb")
    db.execute("INSERT INTO events " + SYNTHETIC.format(start=events, stop=events + history))
    db.execute("CHECKPOINT")
    started = time.perf_counter()
    result = ingest(db, store)
    seconds = time.perf_counter() - started
    total, distinct = db.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    db.close()
    assert result.inserted == events and total == distinct == events + history, (result, total, distinct)
    return {"events_per_s": round(events / seconds), "seconds": round(seconds, 2), "segments": result.segments}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200,000 events (a smoke run)")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--segment-events", type=int, default=local_bench.SEGMENT_EVENTS,
                        help="events per segment (a lightly loaded gateway seals small ones)")
    args = parser.parse_args()
    local_bench.SEGMENT_EVENTS = args.segment_events
    events = 200_000 if args.quick else args.events
    history = 2 * events
    report: dict = {"events": events, "events_per_segment": args.segment_events, "history_events": history, "cores": len(os.sched_getaffinity(0))}
    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3:
        root = Path(tmp)
        write_segments(root / "segments", events)
        names = sorted(p.name for p in (root / "segments").iterdir())
        report["segment_bytes"] = sum((root / "segments" / n).stat().st_size for n in names)
        os.environ.update(s3.env)
        s3.create_bucket("bench")
        remote = ObjectSegments("s3://bench/events")
        started = time.perf_counter()
        remote._each(lambda n: remote.put(n, (root / "segments" / n).read_bytes()), names)
        report["upload_seconds"] = round(time.perf_counter() - started, 2)

        (root / "local").mkdir()
        report["local"] = timed_ingest(root / "local", LocalSegments(root / "segments"), events, history)
        (root / "s3").mkdir()
        report["s3"] = timed_ingest(root / "s3", remote, events, history)
        assert remote.list_sealed() == [] and len(s3.keys("bench", f"events/{INGESTED}/")) == len(names)
        shutil.rmtree(root / "segments")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
