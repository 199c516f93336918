"""The segment sink's write-ahead spool (proxy/sinks/spool.py): what a killed process leaves is recovered
exactly, a live process's spool is never taken, and nothing but a row of the events' column types is read."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections import deque
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec

from proxy.events import Event
from proxy.sinks.spool import EventSpool, read_rows

ROW = Event(event_id=uuid.uuid4(), ts=datetime(2026, 12, 7, 3, 0, 0, 123456, tzinfo=UTC), tenant="acme",
            provider="openai", model="gpt-4o-mini", endpoint="openai/chat.completions.create", status_code=200,
            outcome="ok", key_id="operator-openai", billing_mode="unified", input_tokens=12, output_tokens=34,
            cost_usd=Decimal("0.000012345"), latency_ms=1.25).row()


def rows_of(directory: Path) -> list[tuple]:
    return [row for path in sorted(directory.glob("*.spool")) for row in read_rows(path.read_bytes())]


def test_rows_are_spooled_before_they_are_queued_and_a_sealed_generation_goes(tmp_path):
    spool, queue = EventSpool(tmp_path, "a"), deque()
    spool.append(ROW, queue)
    assert list(queue) == [ROW] and rows_of(tmp_path) == [ROW]
    taken = spool.take(queue, lambda n: None)
    spool.append(ROW[:1] + ROW[1:], queue)  # a row of the next generation
    assert taken == [ROW] and len(rows_of(tmp_path)) == 2
    spool.sealed()
    assert rows_of(tmp_path) == [ROW] and len(list(tmp_path.glob("*.spool"))) == 1
    spool.close(everything_sealed=False)
    assert rows_of(tmp_path) == [ROW], "rows not sealed at exit stay for the next start"


def test_a_killed_writer_leaves_rows_a_new_process_adopts_once_even_with_a_torn_last_frame(tmp_path):
    script = (f"import sys, uuid; sys.path.insert(0, {str(Path(__file__).parents[1])!r});"
              "from collections import deque; from tests.test_spool import ROW;"
              "from proxy.sinks.spool import EventSpool;"
              f"s = EventSpool(__import__('pathlib').Path({str(tmp_path)!r}), 'dead'); q = deque();"
              "[s.append((uuid.UUID(int=i),) + ROW[1:], q) for i in range(3)];"
              "import os; os._exit(0)")  # no close: as a SIGKILL would leave it
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    (dead,) = tmp_path.glob("dead-*.spool")
    with dead.open("ab") as file:
        file.write((500).to_bytes(4, "little") + b"partial")  # killed in the middle of a write
    spool = EventSpool(tmp_path, "b")
    recovered = spool.adopt()
    assert [row[0] for row in recovered] == [uuid.UUID(int=i) for i in range(3)]
    assert recovered[0][1:] == ROW[1:], "the exact values: UUID, timestamp, Decimal, None, bool, float"
    assert type(recovered[0][0]) is uuid.UUID and recovered[0][1].tzinfo is not None
    assert EventSpool(tmp_path, "c").adopt() == [], "adopted files are held by the adopter"
    spool.sealed()
    assert not dead.exists()


def test_a_live_process_spool_is_never_adopted(tmp_path):
    live, queue = EventSpool(tmp_path, "live"), deque()
    live.append(ROW, queue)
    assert EventSpool(tmp_path, "other").adopt() == []
    assert rows_of(tmp_path) == [ROW]


def test_a_frame_that_is_not_a_row_leaves_its_file_in_place(tmp_path):
    data = msgspec.msgpack.encode(["not", "an", "event"])
    bad = tmp_path / "x.spool"
    bad.write_bytes(len(data).to_bytes(4, "little") + data)
    assert EventSpool(tmp_path, "b").adopt() == []
    assert bad.exists(), "kept for an operator, never deleted as if sealed"


def test_a_spool_that_cannot_rotate_keeps_queueing_rows(tmp_path):
    directory = tmp_path / "spool"
    spool, queue = EventSpool(directory, "a"), deque()
    spool.append(ROW, queue)
    shutil.rmtree(directory)  # the disk's directory gone (as root, permissions would not stop a rotation)
    assert spool.take(queue, lambda n: None) == [ROW]
    assert spool.broken and "No such file" in spool.broken
    spool.append(ROW, queue)
    assert list(queue) == [ROW], "a broken spool never refuses or loses a request's row"
