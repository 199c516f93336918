"""The report schedule inside `tollway serve` (APScheduler 3): every `report_interval_s`, and at once
when `tollway report run` leaves a trigger file. No overlapping runs; a failing run is logged and
simply tried again next time, the gateway keeps serving."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from analytics.jobs import TRIGGER

log = logging.getLogger("tollway.reports")
logging.getLogger("apscheduler").setLevel(logging.WARNING)


class ReportSchedule:
    def __init__(self, build: Callable[[], dict], reports_dir: Path, interval_s: int) -> None:
        self._build = build  # blocking: runs in a worker thread
        self._reports_dir = reports_dir
        self._interval = interval_s
        self._lock = asyncio.Lock()
        self._scheduler = AsyncIOScheduler(timezone="UTC")

    def start(self) -> None:
        options = {"coalesce": True, "max_instances": 1, "misfire_grace_time": self._interval}
        self._scheduler.add_job(self.run, "interval", seconds=self._interval, id="reports", **options)
        self._scheduler.add_job(self._check_trigger, "interval", seconds=1, id="report-trigger", **options)
        self._scheduler.start()

    def stop(self) -> None:
        self._scheduler.shutdown(wait=False)

    async def run(self) -> None:
        if self._lock.locked():
            return  # a run is under way: its result is at most a moment old
        async with self._lock:
            try:
                manifest = await asyncio.to_thread(self._build)
                log.info("reports built from %d events in %.2f s", manifest["source_rows"], manifest["build_seconds"])
            except Exception:
                log.exception("report build failed; the previous reports stay, the next run tries again")

    async def _check_trigger(self) -> None:
        trigger = self._reports_dir / TRIGGER
        if trigger.exists() and not self._lock.locked():  # a build under way may predate the request
            trigger.unlink(missing_ok=True)
            await self.run()
