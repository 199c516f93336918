"""A local write-ahead spool for the segment sink: a killed gateway process loses no answered event.

Without it, an event waits in the process's memory until the next seal (`flush_interval_ms`), and a
SIGKILL, a crash or an OOM kill loses it. With it, `record()` also writes the event's row to a spool
file in `DIR/spool/` (one `write()` of a few hundred bytes into the page cache, no fsync) before the
response's last byte leaves, so the row outlives the process; only a power cut or kernel crash of
the machine can lose the unsynced tail.

Generations. Every flush rotates the spool under the same lock that takes the batch out of the
queue, so a generation file holds exactly rows of batches already taken or still queued. A
generation is deleted only after a flush that kept nothing (every row before it sealed or set
aside). Each file is held with an exclusive `flock` by the process that owns it; at start a process
adopts every spool file whose lock it can take (its owner died), queues its rows and seals them.
A row that was sealed just before the kill is sealed again: harmless, the pipeline skips an
`event_id` it already holds.

Frames: a 4-byte little-endian length, then the row as MessagePack, decoded into the exact column
types of `proxy.events.COLUMNS`. Reading stops at a truncated last frame (a kill in the middle of a
write); a file with a frame this version cannot read is left in place, with a log line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import uuid
from collections import deque
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import msgspec

from proxy.events import COLUMNS

log = logging.getLogger("tollway.recorder")
SUFFIX = ".spool"
_LENGTH = 4
_TYPES = {"UUID": uuid.UUID, "TIMESTAMPTZ": datetime, "VARCHAR": str, "BOOLEAN": bool, "INTEGER": int,
          "BIGINT": int, "DOUBLE": float, "DECIMAL(18,9)": Decimal}


def _column_type(sql: str) -> type:
    kind = _TYPES[sql.removesuffix(" NOT NULL")]
    return kind if sql.endswith("NOT NULL") else kind | None


#: A row's exact types back from MessagePack (UUIDs and Decimals travel as text, timestamps as
#: MessagePack timestamps); nothing but these values can come out of a spool file.
_encode = msgspec.msgpack.Encoder(decimal_format="string").encode
_decode = msgspec.msgpack.Decoder(tuple[tuple(_column_type(sql) for _, sql in COLUMNS)]).decode


class UnreadableSpool(ValueError):
    """A complete frame that is not a row of this version's events: the file is left for an operator."""


def read_rows(data: bytes) -> list[tuple]:
    """The rows of a spool file's bytes, up to a truncated last frame (a kill in the middle of a write)."""
    rows, at = [], 0
    while at + _LENGTH <= len(data):
        size = int.from_bytes(data[at:at + _LENGTH], "little")
        frame = data[at + _LENGTH:at + _LENGTH + size]
        if len(frame) < size:
            break
        try:
            rows.append(_decode(frame))
        except msgspec.DecodeError as exc:
            raise UnreadableSpool(f"frame at byte {at}: {exc}") from exc
        at += _LENGTH + size
    return rows


@contextlib.contextmanager
def _unlocked(path: Path):
    """Enter only when no process holds `path`'s lock (raises BlockingIOError otherwise)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


class EventSpool:
    """`append(row, queue)` spools and queues one row; `take(queue)` rotates and empties the queue;
    `sealed()` drops the generations whose rows are all sealed; `adopt()` recovers dead processes' files."""

    def __init__(self, directory: Path, prefix: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.lock = threading.Lock()
        self._prefix = prefix
        self._counter = 0
        self._retired: list[tuple[int, Path]] = []  # rotated out, locked, not yet known to be sealed
        self._fd, self._path = self._open()
        self._written = False  # anything in the current generation
        self.broken: str | None = None

    def _open(self) -> tuple[int, Path]:
        self._counter += 1
        path = self.directory / f"{self._prefix}-{self._counter:08d}{SUFFIX}"
        staged = self.directory / f".{path.name}.tmp"  # locked before it has a name another process adopts
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(staged, path)
        return fd, path

    def append(self, row: tuple, queue: deque) -> None:
        """Write the row, then queue it: a row is never queued without being spooled first."""
        data = _encode(row)
        with self.lock:
            if self.broken is None:
                try:
                    os.write(self._fd, len(data).to_bytes(_LENGTH, "little") + data)
                    self._written = True
                except OSError as exc:  # a full disk must not refuse the request: the row is still queued
                    self.broken = f"{type(exc).__name__}: {exc}"
                    log.error("spool %s cannot be written, events wait in memory only until it is: %s",
                              self.directory, self.broken)
            queue.append(row)

    def take(self, queue: deque, on_count) -> list[tuple]:
        """Rotate the generation and take every queued row, atomically with respect to `append`."""
        with self.lock:
            if self._written:
                self._retired.append((self._fd, self._path))
                try:
                    self._fd, self._path = self._open()
                    self._written = False
                except OSError as exc:
                    self._fd, self._path = self._retired.pop()
                    self.broken = f"{type(exc).__name__}: {exc}"
                    log.error("spool %s cannot rotate: %s", self.directory, self.broken)
            on_count(len(queue))
            return [queue.popleft() for _ in range(len(queue))]

    def sealed(self) -> None:
        """Every row taken so far is sealed (or set aside): their generations go."""
        retired, self._retired = self._retired, []
        for fd, path in retired:
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)

    def adopt(self) -> list[tuple]:
        """The rows of every spool file no live process holds; the files become this process's
        retired generations (deleted once their rows are sealed)."""
        rows: list[tuple] = []
        for stale in self.directory.glob(f".*{SUFFIX}.tmp"):  # a process killed while naming a new file
            with contextlib.suppress(OSError), _unlocked(stale):
                stale.unlink()
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path == self._path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # its owner deleted it meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a live process's
                continue
            try:
                with os.fdopen(os.dup(fd), "rb") as file:
                    found = read_rows(file.read())
            except UnreadableSpool as exc:
                log.error("spool: %s is not readable by this version and stays where it is: %s", path.name, exc)
                os.close(fd)
                continue
            log.info("spool: recovered %d events of a process that ended before sealing them (%s)",
                     len(found), path.name)
            rows.extend(found)
            self._retired.append((fd, path))
        return rows

    def close(self, everything_sealed: bool) -> None:
        """At exit: remove the spool when every row is sealed; otherwise keep it for the next start."""
        if everything_sealed:
            self.sealed()
            with contextlib.suppress(OSError):
                self._path.unlink()
            os.close(self._fd)
            return
        for fd, _ in self._retired:
            os.close(fd)
        if not self._written:  # this generation holds nothing: no empty file left for the next start
            with contextlib.suppress(OSError):
                self._path.unlink()
        os.close(self._fd)
