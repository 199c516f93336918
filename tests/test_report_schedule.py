"""The report schedule: a failing build is logged and retried, runs never overlap, triggers are honoured."""

from __future__ import annotations

import asyncio
import threading

from analytics.jobs import TRIGGER
from analytics.scheduler import ReportSchedule


async def test_a_failing_build_is_logged_and_the_next_run_tries_again(tmp_path, caplog):
    calls = []

    def build() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return {"source_rows": 3, "build_seconds": 0.01}

    schedule = ReportSchedule(build, tmp_path, interval_s=60)
    await schedule.run()
    assert "report build failed" in caplog.text and "disk full" in caplog.text
    await schedule.run()
    assert len(calls) == 2


async def test_runs_never_overlap(tmp_path):
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_build() -> dict:
        calls.append(1)
        started.set()
        release.wait(5)
        return {"source_rows": 0, "build_seconds": 0.0}

    schedule = ReportSchedule(slow_build, tmp_path, interval_s=60)
    first = asyncio.create_task(schedule.run())
    await asyncio.to_thread(started.wait, 5)
    await schedule.run()  # while the first is under way: skipped, not queued
    release.set()
    await first
    assert len(calls) == 1


async def test_a_trigger_file_starts_a_run_and_is_consumed(tmp_path):
    calls = []
    schedule = ReportSchedule(lambda: calls.append(1) or {"source_rows": 0, "build_seconds": 0.0}, tmp_path, 60)
    await schedule._check_trigger()
    assert calls == []
    (tmp_path / TRIGGER).write_text("now")
    await schedule._check_trigger()
    assert calls == [1] and not (tmp_path / TRIGGER).exists()
