"""`tollway serve --workers N`: N gateway processes on one listening socket, supervised.

The supervisor binds the port once (`proxy.server.bind_socket`) and starts N workers, each
`tollway serve` given that socket by descriptor: each builds its own gateway (`build_gateway`) and
accepts on the shared socket (the kernel hands each connection to one of them). N > 1 needs the
Redis limit store (counters shared by every worker) and the segment sink (each worker seals its own
segments). A worker that dies is started again after a back-off (0.5 s doubling up to 30 s, reset
once a worker has served for a minute); the segments it sealed are on disk and stay there for the
pipeline, only its unsealed buffer (at most one flush interval) is lost. A worker of the first
launch that fails before it is ready (bad settings, Redis unreachable at start) stops them all:
its error is above. SIGTERM or SIGINT: every worker drains (in-flight requests finish, buffers are
sealed) and the supervisor exits 0 when all of them did.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tollway.workers")
DRAIN_S = 60.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
PR_SET_PDEATHSIG = 1


def scale_out_problem(settings, workers: int) -> str | None:
    """Why `--workers N` (N > 1) cannot run with these settings, naming what to set; None when it can."""
    missing = []
    if not settings.limits.store.startswith(("redis://", "rediss://", "unix://")):
        missing.append('[limits] store = "redis://HOST:PORT/DB" (limit counters, reservations and key '
                       "cool-downs shared by every worker)")
    if settings.events.sink != "segments":
        missing.append('[events] sink = "segments" (each worker seals its own event segments; run '
                       "`tollway pipeline` to ingest them)")
    if not missing:
        return None
    return (f"--workers {workers} needs several processes to share state; set in "
            f"{settings.data_dir / 'tollway.toml'}: " + " and ".join(missing) + " (or serve with --workers 1)")


@dataclass
class Slot:
    index: int
    proc: subprocess.Popen | None = None
    ready_fd: int | None = None
    ready: bool = False
    launches: int = 0
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0


class Supervisor:
    def __init__(self, data_dir: Path, sock: socket.socket, count: int, host: str, port: int) -> None:
        self.data_dir = data_dir
        self.sock = sock
        self.slots = [Slot(i + 1) for i in range(count)]
        self.host, self.port = host, port
        self._stop = False
        self._fatal: int | None = None

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for slot in self.slots:
            self._launch(slot)
        while not self._stop and self._fatal is None:
            self._wait_ready(0.2)
            for slot in self.slots:
                self._tend(slot)
        return self._drain()

    def _on_signal(self, sig, frame) -> None:
        if not self._stop:
            log.info("%s: draining %d worker(s)", signal.Signals(sig).name, len(self.slots))
        self._stop = True

    def _launch(self, slot: Slot) -> None:
        read_fd, write_fd = os.pipe()
        argv = [sys.executable, "-m", "proxy.cli", "--data-dir", str(self.data_dir), "serve", "--host", self.host,
                "--port", str(self.port), "--worker-fd", str(self.sock.fileno()), "--ready-fd", str(write_fd)]
        slot.proc = subprocess.Popen(argv, pass_fds=(self.sock.fileno(), write_fd), start_new_session=True,
                                     preexec_fn=_die_with_parent)
        os.close(write_fd)
        slot.ready_fd, slot.ready = read_fd, False
        slot.launches += 1
        slot.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _wait_ready(self, timeout: float) -> None:
        waiting = {slot.ready_fd: slot for slot in self.slots if slot.ready_fd is not None}
        if not waiting:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(waiting), [], [], timeout)
        for fd in readable:
            slot = waiting[fd]
            if os.read(fd, 1):
                slot.ready = True
                log.info("worker %d ready (pid %d)", slot.index, slot.proc.pid)
            os.close(fd)  # ready, or the worker closed it by exiting
            slot.ready_fd = None

    def _tend(self, slot: Slot) -> None:
        """Notice a worker that exited; start it again when its back-off is over."""
        now = time.monotonic()
        if slot.proc is not None and slot.proc.poll() is not None:
            self._exited(slot, now)
        if slot.proc is None and not self._stop and self._fatal is None and now >= slot.restart_at:
            self._launch(slot)

    def _exited(self, slot: Slot, now: float) -> None:
        code, pid = slot.proc.returncode, slot.proc.pid
        slot.proc = None
        if slot.ready_fd is not None:
            os.close(slot.ready_fd)
            slot.ready_fd = None
        if slot.launches == 1 and not slot.ready:
            log.error("worker %d (pid %d) could not start (exit status %s): stopping", slot.index, pid, code)
            self._fatal = 1
            return
        slot.failures = 0 if now - slot.started_at >= HEALTHY_AFTER_S else slot.failures + 1
        delay = min(BACKOFF_MAX_S, 0.5 * 2 ** slot.failures)
        slot.restart_at = now + delay
        log.error("worker %d (pid %d) exited (%s); starting it again in %.1f s (its sealed segments are kept, "
                  "at most its unsealed events are lost)", slot.index, pid, _status(code), delay)

    def _drain(self) -> int:
        live = [slot.proc for slot in self.slots if slot.proc is not None and slot.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        self.sock.close()
        deadline = time.monotonic() + DRAIN_S
        codes = []
        for proc in live:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop within %.0f s: killed", proc.pid, DRAIN_S)
                proc.kill()
                codes.append(proc.wait())
        if self._fatal is not None:
            return self._fatal
        log.info("all workers stopped")
        return 0 if all(code == 0 for code in codes) else 1


def _status(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies (Linux), so no worker is orphaned."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
