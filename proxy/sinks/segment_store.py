"""Where sealed segments live: a local directory or object storage, behind one small interface.

    segments_dir = "" | "PATH" | "file:///PATH"          ─▶ LocalSegments  (temporary name, fsync, rename)
    segments_dir = "s3://B/P" | "gs://B/P" | "az://C/P"  ─▶ ObjectSegments (obstore: one PUT seals)

The layout is the same in both: sealed segments at the top, `ingested/` and `rejected/` below (the
pipeline moves segments there). On object storage an object appears whole when its PUT completes,
so the PUT of the complete Parquet file is the seal. Credentials and the endpoint come from each
store's own environment variables (obstore reads AWS_*, GOOGLE_*, AZURE_*), never from
`tollway.toml`; error messages are shown with URL query strings removed (they can carry a SAS).

Object store calls retry inside obstore briefly (`RETRY`: a few tries with backoff within seconds),
so an unreachable store is reported within seconds and the event writer's own retry (every flush
interval, rows kept, fail closed at `max_buffered`) takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from proxy.settings import OBJECT_STORE_SCHEMES, EventSettings, segments_scheme

log = logging.getLogger("tollway.recorder")
SUFFIX = ".parquet"
INGESTED = "ingested"
REJECTED = "rejected"
#: Concurrent object store requests of one fetch or move.
CONCURRENCY = 16
BULK_DELETE = 1000  # keys per delete request (S3's limit)
CHECK_EVERY_S, CHECK_TIMEOUT_S = 5.0, 1.5  # the /readyz probe of object storage
RETRY = {"max_retries": 3, "retry_timeout": timedelta(seconds=10),
         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2), "base": 2}}


class SegmentStore(Protocol):
    """What the segment sink and the pipeline need of the place segments live."""

    location: str  # for messages: the directory or the URL (never a credential)

    def seal(self, name: str, write: Callable[[Path], None]) -> None:
        """`write(path)` fills a local file; then it appears, complete, as the sealed segment `name`."""

    def put(self, name: str, data: bytes) -> None:
        """Seal `data` as `name`."""

    def list_sealed(self) -> list[str]:
        """The sealed segments waiting (not under `ingested/` or `rejected/`), by name."""

    def local_copies(self, names: list[str]) -> contextlib.AbstractContextManager[dict[str, Path]]:
        """Local files holding the named segments (a directory's own files; fetched copies otherwise).
        Raises FileNotFoundError when one is gone (moved by the pipeline meanwhile)."""

    def move(self, names: list[str], folder: str) -> None:
        """Move the named segments under `folder/` (ingested/, rejected/)."""

    async def check(self) -> str:
        """"ok", or why segments cannot be written there now (for /readyz; cheap enough to call often)."""

    def delete_before(self, folder: str, cutoff: datetime) -> int:
        """Delete the segments under `folder/` last written before `cutoff`; returns how many."""


def segment_store_for(events: EventSettings, data_dir: Path) -> SegmentStore:
    """The store `[events] segments_dir` names (validated by `proxy.settings`)."""
    if segments_scheme(events.segments_dir) in OBJECT_STORE_SCHEMES:
        return ObjectSegments(events.segments_dir.rstrip("/"))
    return LocalSegments(events.segments_path(data_dir))


def safe_error(exc: BaseException) -> str:
    """An object store error in one line, with URL query strings (a SAS token) removed."""
    text = str(exc).split("\n\nDebug source:")[0].strip().splitlines()
    return re.sub(r"(https?://[^\s?]+)\?\S*", r"\1?…", text[0] if text else type(exc).__name__)


# --- a local directory ---------------------------------------------------------------------------
def sealed_segments(directory: Path) -> list[Path]:
    """The sealed segments waiting in `directory`, by name (temporary files start with a dot)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / name for name in sorted(names) if name.endswith(SUFFIX) and not name.startswith(".")]


def sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalSegments:
    """A directory every process of the deployment shares (one machine, or a shared file system)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.location = str(directory)

    def seal(self, name: str, write: Callable[[Path], None]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / name
        temporary = self.directory / f".{name}.tmp"
        try:
            write(temporary)
            fsync_path(temporary)
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        try:
            fsync_path(self.directory)  # the rename itself survives a power cut
        except OSError as exc:
            log.warning("could not fsync %s after sealing %s: %s", self.directory, name, exc)

    def put(self, name: str, data: bytes) -> None:
        self.seal(name, lambda path: path.write_bytes(data))

    def list_sealed(self) -> list[str]:
        return [path.name for path in sealed_segments(self.directory)]

    async def check(self) -> str:
        existing = self.directory  # the first seal creates the directory: its nearest parent must allow that
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if os.access(existing, os.W_OK | os.X_OK):
            return "ok"
        return f"segments directory {self.directory} cannot be written (check {existing}'s permissions)"

    @contextlib.contextmanager
    def local_copies(self, names: list[str]) -> Iterator[dict[str, Path]]:
        yield {name: self.directory / name for name in names}

    def move(self, names: list[str], folder: str) -> None:
        """A rename on the same file system."""
        target = self.directory / folder
        target.mkdir(exist_ok=True)
        for name in names:
            os.replace(self.directory / name, target / name)

    def delete_before(self, folder: str, cutoff: datetime) -> int:
        deleted = 0
        for path in (self.directory / folder).glob("*" + SUFFIX):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff.timestamp():
                    path.unlink()
                    deleted += 1
        return deleted


# --- object storage ------------------------------------------------------------------------------
class ObjectSegments:
    """s3://, gs:// or az:// through obstore. Objects appear atomically: no temporary names."""

    def __init__(self, url: str) -> None:
        import obstore.store

        self.location = url
        try:
            self._store = obstore.store.from_url(url, retry_config=RETRY)
        except Exception as exc:  # a malformed URL, an unknown AWS_* value in the environment
            raise ValueError(f"segments_dir {url!r}: {safe_error(exc)}") from exc
        self._checked: tuple[float, str] = (-CHECK_EVERY_S, "ok")

    def seal(self, name: str, write: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(prefix="tollway-seal-") as tmp:
            path = Path(tmp) / name
            write(path)
            data = path.read_bytes()
        self.put(name, data)

    def put(self, name: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, name, data)
        except Exception as exc:
            raise OSError(f"PUT {name} to {self.location} failed: {safe_error(exc)}") from exc

    def list_sealed(self) -> list[str]:
        import obstore

        try:
            found = obstore.list_with_delimiter(self._store)  # the top level only: not ingested/, rejected/
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise OSError(f"cannot list {self.location}: {safe_error(exc)}") from exc
        return sorted(meta["path"] for meta in found["objects"]
                      if meta["path"].endswith(SUFFIX) and "/" not in meta["path"])

    async def check(self) -> str:
        """One LIST of the prefix, at most every CHECK_EVERY_S (load balancers ask often), bounded in time:
        an idle gateway learns that its store went away before a seal fails."""
        import obstore

        at, result = self._checked
        if time.monotonic() - at < CHECK_EVERY_S:
            return result
        try:
            await asyncio.wait_for(obstore.list_with_delimiter_async(self._store), CHECK_TIMEOUT_S)
            result = "ok"
        except FileNotFoundError:
            result = "ok"  # nothing sealed yet under the prefix
        except TimeoutError:
            result = f"object store {self.location} did not answer a LIST within {CHECK_TIMEOUT_S} s"
        except Exception as exc:
            result = f"object store {self.location} cannot be listed: {safe_error(exc)}"
        self._checked = (time.monotonic(), result)
        return result

    def get(self, name: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self._store, name).bytes())
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise OSError(f"GET {name} from {self.location} failed: {safe_error(exc)}") from exc

    @contextlib.contextmanager
    def local_copies(self, names: list[str]) -> Iterator[dict[str, Path]]:
        """Fetched concurrently into a private temporary directory, removed afterwards."""
        with tempfile.TemporaryDirectory(prefix="tollway-ingest-") as tmp:
            def fetch(name: str) -> Path:
                path = Path(tmp) / name
                path.write_bytes(self.get(name))
                return path

            yield dict(zip(names, self._each(fetch, names), strict=True))

    def move(self, names: list[str], folder: str) -> None:
        """Copies under `folder/` (concurrently), then one bulk delete of the originals: a rename per
        object would pay a delete request each. Killed in between, an object is in both places: the
        pipeline's ledger names it, and the next run moves it again."""
        import obstore

        def copy(name: str) -> str | None:
            try:
                obstore.copy(self._store, name, f"{folder}/{name}")
            except FileNotFoundError:
                return None  # moved by an earlier run that died before it reported
            except Exception as exc:
                raise OSError(f"cannot move {name} to {folder}/ in {self.location}: {safe_error(exc)}") from exc
            return name

        copied = [name for name in self._each(copy, names) if name is not None]
        try:
            for start in range(0, len(copied), BULK_DELETE):
                obstore.delete(self._store, copied[start:start + BULK_DELETE])
        except Exception as exc:
            raise OSError(f"cannot delete moved segments in {self.location}: {safe_error(exc)}") from exc

    def delete_before(self, folder: str, cutoff: datetime) -> int:
        import obstore

        old = [meta["path"] for chunk in obstore.list(self._store, prefix=folder) for meta in chunk
               if meta["last_modified"] < cutoff.astimezone(UTC)]
        for start in range(0, len(old), BULK_DELETE):
            obstore.delete(self._store, old[start:start + BULK_DELETE])
        return len(old)

    @staticmethod
    def _each(call: Callable[[str], object], names: list[str]) -> list:
        """`call` for every name, CONCURRENCY at a time (obstore releases the GIL while it waits)."""
        if len(names) <= 1:
            return [call(name) for name in names]
        with ThreadPoolExecutor(min(CONCURRENCY, len(names)), thread_name_prefix="tollway-segments") as pool:
            return list(pool.map(call, names))
