"""Writes to the control store that a request must never wait for: audit entries and key health.

The gateway's side effects (a budget alert's audit entry, a key marked failing, a policy reload)
go onto a queue that one thread writes through its own connection, in order. A write that finds
the database locked (a CLI command, a backup holding a transaction) is retried until it commits,
so a lock delays the entry, never the request that caused it, and never drops that request's
event. PostgreSQL unreachable is retried the same way, until it is back. On shutdown the queue is drained for at most `drain_s` seconds; whatever is still locked
out then is logged as lost, entry by entry.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from proxy.control import RETRYABLE, ControlStore

log = logging.getLogger("tollway.control")

Job = Callable[[ControlStore], None]
_STOP = object()


class ControlWriter:
    def __init__(self, open_store: Callable[[], ControlStore], *, retry_s: float = 0.1, max_retry_s: float = 2.0,
                 drain_s: float = 10.0) -> None:
        self._open_store = open_store
        self._retry_s, self._max_retry_s, self._drain_s = retry_s, max_retry_s, drain_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop_by: float | None = None  # monotonic deadline once closing
        self._submitted = self._done = 0  # each written by one thread only: no lock needed
        self._thread = threading.Thread(target=self._run, name="control-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Writes queued or being retried."""
        return self._submitted - self._done

    def submit(self, what: str, job: Job) -> None:
        """Queue `job(store)`; `what` names it in the log if it cannot be written. Never blocks."""
        self._submitted += 1
        self._queue.put((what, job))

    def close(self) -> None:
        """Write what is queued (retrying locks for at most `drain_s`), then stop the thread."""
        self._stop_by = time.monotonic() + self._drain_s
        self._queue.put(_STOP)
        self._thread.join(self._drain_s + 6)  # + one busy timeout for the write in progress

    def _run(self) -> None:
        store = None
        while (item := self._queue.get()) is not _STOP:
            what, job = item
            store = self._write(store, what, job)
            self._done += 1
        if store is not None:
            store.close()

    def _write(self, store: ControlStore | None, what: str, job: Job) -> ControlStore | None:
        """One job, retried while the database is locked; returns the connection to use next."""
        wait, warned = self._retry_s, False
        while True:
            try:
                store = store or self._open_store()
                job(store)
                if warned:
                    log.info("control.db: %s written after the lock cleared", what)
                return store
            except RETRYABLE as exc:  # locked or busy (another process holds a write lock), or PostgreSQL down
                if self._stop_by is not None and time.monotonic() >= self._stop_by:
                    log.error("control.db: %s not written before shutdown (%s)", what, exc)
                    return store
                if not warned:
                    log.warning("control.db: %s waits (%s); retrying until it can be written", what, exc)
                    warned = True
                time.sleep(wait)
                wait = min(wait * 2, self._max_retry_s)
            except Exception:  # a bug must not stop the writer: log it and go on with the next entry
                log.exception("control.db: %s failed", what)
                return store
