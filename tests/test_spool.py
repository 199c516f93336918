"""The segment sink's write-ahead spool (proxy/sinks/spool.py): what a killed process leaves is recovered
exactly, a live process's spool is never taken, and only a row's own value types are ever unpickled."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import uuid
from collections import deque
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.sinks.spool import EventSpool, read_rows

ROW = (uuid.uuid4(), datetime(2026, 12, 7, 3, 0, tzinfo=UTC), "acme", None, "token", "openai", "gpt-4o-mini",
       "openai/chat.completions.create", False, 200, "ok", "operator-openai", "unified", 12, 34,
       Decimal("0.000012345"), True)


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
    assert recovered[0][1:] == ROW[1:], "the exact values: UUID, timestamp, Decimal, None, bool"
    assert EventSpool(tmp_path, "c").adopt() == [], "adopted files are held by the adopter"
    spool.sealed()
    assert not dead.exists()


def test_a_live_process_spool_is_never_adopted(tmp_path):
    live, queue = EventSpool(tmp_path, "live"), deque()
    live.append(ROW, queue)
    assert EventSpool(tmp_path, "other").adopt() == []
    assert rows_of(tmp_path) == [ROW]


class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_frame_that_is_not_a_row_is_refused(tmp_path):
    data = pickle.dumps((ROW[0], Evil()))
    (tmp_path / "x.spool").write_bytes(len(data).to_bytes(4, "little") + data)
    assert EventSpool(tmp_path, "b").adopt() == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_spool_that_cannot_rotate_keeps_queueing_rows(tmp_path):
    spool, queue = EventSpool(tmp_path, "a"), deque()
    spool.append(ROW, queue)
    tmp_path.chmod(0o500)
    try:
        assert spool.take(queue, lambda n: None) == [ROW]
        assert spool.broken and "Permission" in spool.broken
        spool.append(ROW, queue)
        assert list(queue) == [ROW]
    finally:
        tmp_path.chmod(0o700)
