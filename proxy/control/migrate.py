"""`tollway control migrate --to postgresql://...`: the deployment's control.db copied into PostgreSQL.

The target must be empty (its schema is created first, at the current version). Every table is copied
as it is, ids and the audit log's sequence high-water mark included, in one transaction; then the
rows are counted on both sides and the audit chain is verified on the target. Nothing in the
deployment changes: the operator switches by adding the `[control] url` line the summary prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.control.model import ControlError
from proxy.control.schema import TABLES
from proxy.control.store import ControlStore
from proxy.control.target import describe
from proxy.crypto import Keyring

BATCH = 5000
#: meta rows the target writes itself on creation (and the master key check must match anyway)
_OWN_META = ("schema_version", "master_key_check")


@dataclass
class MigrationReport:
    source: str
    target: str
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # table -> (source rows, target rows)
    audit_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.audit_problems and all(a == b for a, b in self.counts.values())

    def as_json(self) -> dict:
        return {"source": self.source, "target": self.target, "ok": self.ok,
                "tables": {t: {"source": a, "target": b} for t, (a, b) in self.counts.items()},
                "audit_problems": self.audit_problems}


def migrate_store(source: Path, url: str, keyring: Keyring,
                  progress: Callable[[str], None] = lambda _: None) -> MigrationReport:
    """Copy `source` (a SQLite control store) into the empty PostgreSQL store at `url`, then verify it."""
    from proxy.audit import verify_chain

    src = ControlStore(source, keyring)  # same master key on both sides: checked here and on the target
    try:
        dst = ControlStore(url, keyring, actor="migrate")
        try:
            _refuse_non_empty(dst, url)
            report = MigrationReport(str(source), describe(url))
            with dst.connection.transaction():
                for table in TABLES:
                    _copy(src, dst, table, progress)
                _move_sequences(src, dst)
            for table in TABLES:
                report.counts[table] = (src.count(table), dst.count(table))
            report.audit_problems = verify_chain(dst.audit_entries(), dst.audit_high_water())
            return report
        finally:
            dst.close()
    finally:
        src.close()


def _refuse_non_empty(dst: ControlStore, url: str) -> None:
    filled = [t for t in TABLES if t != "meta" and dst.count(t)]
    if filled:
        raise ControlError(f"{describe(url)} already holds a control store ({', '.join(filled)} not empty): "
                           "migrate into an empty database")


def _copy(src: ControlStore, dst: ControlStore, table: str, progress: Callable[[str], None]) -> None:
    columns = src.connection.columns(table)
    missing = set(columns) - set(dst.connection.columns(table))
    if missing:
        raise ControlError(f"{table}: the target has no column(s) {sorted(missing)}")
    names = ", ".join(columns)
    where = f" WHERE name NOT IN ({', '.join('?' for _ in _OWN_META)})" if table == "meta" else ""
    cursor = src.connection.execute(f"SELECT {names} FROM {table}{where}", _OWN_META if where else ())
    insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})"
    total = 0
    while rows := cursor.fetchmany(BATCH):
        dst.connection.executemany(insert, [tuple(r) for r in rows])
        total += len(rows)
        if total >= BATCH:
            progress(f"{table}: {total} rows copied")
    progress(f"{table}: {total} rows")


def _move_sequences(src: ControlStore, dst: ControlStore) -> None:
    """Identity sequences continue after the copied ids; the audit log's keeps the source's high-water mark
    (so that newest entries deleted before the copy still show as missing)."""
    for table, column in (("credits", "credit_id"), ("audit_log", "seq")):
        high = src.connection.execute(f"SELECT MAX({column}) FROM {table}").fetchone()[0] or 0
        if table == "audit_log":
            high = max(high, src.audit_high_water() or 0)
        if high:
            dst.connection.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'), ?)", (high,))
