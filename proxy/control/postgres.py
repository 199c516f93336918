"""The PostgreSQL connection of a control store, and the listener that pushes changes to gateways.

The store's SQL is written once, in SQLite's dialect; `translate` maps the little that differs
(`?` placeholders, `INSERT OR IGNORE`). Write transactions take one advisory transaction lock, so
writers (gateways and CLI commands on any machine) commit one at a time and each audit entry links
to the one committed before it: the hash chain stays a chain.

Changes reach gateways by push: a statement trigger on the tables the gateway caches bumps
`control_version` and sends `NOTIFY tollway_control` (delivered at commit). `Listener` holds its own
connection, reconnects by itself after a restart, and reloads on every (re)connect, since
notifications sent while it was away are lost.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator

import psycopg

from proxy.control.model import ControlUnavailable
from proxy.control.target import redact

log = logging.getLogger("tollway.control")
CHANNEL = "tollway_control"
#: pg_advisory_xact_lock key held by every write transaction (and migrations): "tollway" in ASCII.
WRITE_LOCK = 0x746F6C6C776179
CONNECT_TIMEOUT_S = 5


@functools.lru_cache(maxsize=256)
def translate(sql: str) -> str:
    """SQLite's dialect as the store writes it → PostgreSQL's."""
    sql = sql.replace("?", "%s")
    if sql.startswith("INSERT OR IGNORE "):
        sql = "INSERT " + sql.removeprefix("INSERT OR IGNORE ") + " ON CONFLICT DO NOTHING"
    return sql


def connect(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="tollway")
    except psycopg.Error as exc:
        raise ControlUnavailable(f"PostgreSQL at {redact(url)}: {redact(exc, url)}") from None


class PostgresConnection:
    """One connection, opened again on the next call after it broke (PostgreSQL restarted)."""

    dialect = "postgresql"
    integrity_errors: tuple[type[Exception], ...] = (psycopg.IntegrityError,)
    pushes_changes = True

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.read_only = read_only
        self._conn = connect(url)
        self._in_tx = False

    def _live(self) -> psycopg.Connection:
        if self._conn.closed or self._conn.broken:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = connect(self.url)
        return self._conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise ControlUnavailable(f"PostgreSQL at {redact(self.url)}: {redact(exc, self.url)}") from exc

    def execute(self, sql: str, args: tuple | list = ()) -> psycopg.Cursor:
        with self._errors():
            return self._live().execute(translate(sql), tuple(args) or None)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._errors(), self._live().cursor() as cursor:
            cursor.executemany(translate(sql), rows)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction at a time across every writer (advisory lock), rolled back on error."""
        with self._errors(), self._live().transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
            yield

    def data_version(self) -> int:
        """Bumped by every commit that changes what the gateway caches (keys, tokens, credits, periods)."""
        row = self.execute("SELECT version FROM control_version").fetchone()
        return row[0] if row else 0

    def has_table(self, name: str) -> bool:
        return self.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0]

    def columns(self, table: str) -> list[str]:
        rows = self.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                            "current_schema() AND table_name = ? ORDER BY ordinal_position", (table,))
        return [r[0] for r in rows.fetchall()]

    def audit_high_water(self) -> int | None:
        """The audit log's identity sequence (its high-water mark survives deletes of the newest entries)."""
        return self.execute("SELECT pg_sequence_last_value(pg_get_serial_sequence('audit_log', 'seq'))").fetchone()[0]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._conn.close()


class Listener:
    """A thread that calls `on_change()` after each committed change (and after each reconnect), retrying a
    failed `on_change` until it succeeds. `error` says why PostgreSQL cannot be reached, None when it can."""

    PING_S = 5.0

    def __init__(self, url: str, on_change: Callable[[], None], *, retry_s: float = 0.2,
                 max_retry_s: float = 1.0) -> None:
        self._url, self._on_change = url, on_change
        self._retry_s, self._max_retry_s = retry_s, max_retry_s
        self._stop = threading.Event()
        self._pending = False
        self.error: str | None = None
        self.since: float | None = None  # monotonic time the connection was lost
        self._thread = threading.Thread(target=self._run, name="control-listener", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)

    def _run(self) -> None:
        wait = self._retry_s
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as exc:  # connection lost or refused: keep serving the cache, try again soon
                message = redact(exc, self._url)
                if self.error is None:
                    log.error("control store unreachable (%s): serving cached tokens and keys, reconnecting",
                              message)
                    self.since = time.monotonic()
                self.error = message
                self._stop.wait(wait)
                wait = min(wait * 2, self._max_retry_s)
            else:
                wait = self._retry_s

    def _listen(self) -> None:
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name="tollway-listener")
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            if self.error is not None:
                log.info("control store reachable again: reloading tokens and keys")
            self.error, self.since = None, None
            self._pending = True  # whatever changed while we were not listening
            pinged = time.monotonic()
            while not self._stop.is_set():
                if any(True for _ in conn.notifies(timeout=0.0 if self._pending else 0.5, stop_after=1)):
                    for _ in conn.notifies(timeout=0.01):  # a burst of commits: one reload
                        pass
                    self._pending = True
                if self._pending:
                    self._pending = not self._changed()
                if time.monotonic() - pinged > self.PING_S:  # a dead peer is noticed, not waited on forever
                    conn.execute("SELECT 1")
                    pinged = time.monotonic()
                if self._pending:
                    self._stop.wait(self._retry_s)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def _changed(self) -> bool:
        try:
            self._on_change()
            return True
        except Exception as exc:
            log.warning("control store changed but could not be read yet (%s); retrying", redact(exc, self._url))
            return False
