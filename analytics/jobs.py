"""Report jobs: load events from DuckDB into Polars, run the pure report functions, write each
report as Parquet plus a CSV twin (formula-safe text cells, see `csv_safety`) under a temporary name
and rename it into place, then the manifest.

Readers (the dashboard) therefore only ever see whole files. The DuckDB file allows one writing
process, so inside `tollway serve` the gateway's own connection streams the columns the reports read
into a Parquet snapshot, and a short-lived child process (`python -m analytics.jobs`) builds the
reports from it: the build's working set, which grows with a month's events, lives and dies with the
child instead of staying in the gateway's memory. `tollway report run` opens the file read-only when
no gateway holds it, and otherwise asks the running gateway to build (a trigger file it polls) and
waits for the new manifest.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import duckdb
import polars as pl

from analytics.billing import Credit, PeriodUsage, statements
from analytics.csv_safety import csv_safe
from analytics.reports import budget_status, denials, period_usage, tenant_costs, user_costs
from policy.files import LimitRule, Tenant, load_policy_files
from proxy.recorder import DUCKDB_CONFIG

log = logging.getLogger("tollway.reports")

REPORTS: dict[str, Callable[[pl.LazyFrame], pl.LazyFrame]] = {
    "tenant_costs": tenant_costs,
    "user_costs": user_costs,
    "denials": denials,
}
MONEY = pl.Decimal(18, 2)
STATEMENT_SCHEMA = {
    "period": pl.String, "tenant": pl.String, "unified_cost_usd": MONEY, "markup_usd": MONEY, "byok_cost_usd": MONEY,
    "byok_fee_usd": MONEY, "charges_usd": MONEY, "credits_opening_usd": MONEY, "credits_added_usd": MONEY,
    "credits_applied_usd": MONEY, "credits_closing_usd": MONEY, "amount_due_usd": MONEY,
    "unpriced_requests": pl.Int64, "adjustments_usd": MONEY, "closed": pl.Boolean,
}
MANIFEST = "manifest.json"
TRIGGER = ".run-requested"
SNAPSHOT = ".events-snapshot.parquet"
EVENT_COLUMNS = ("ts", "tenant", "user_pseudonym", "provider", "model", "billing_mode", "outcome", "status_code",
                 "input_tokens", "output_tokens", "cached_input_tokens", "usage_source", "cost_usd", "latency_ms")


def code_version() -> str:
    try:
        return version("tollway")
    except PackageNotFoundError:
        return "unknown"


_MONTH = "strftime(ts AT TIME ZONE 'UTC', '%Y-%m')"


def event_months(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [row[0] for row in con.execute(f"SELECT DISTINCT {_MONTH} FROM events ORDER BY 1").fetchall()]


def load_events(con: duckdb.DuckDBPyConnection, month: str | None = None) -> pl.DataFrame:
    """The events (of one UTC month) as a Polars frame, via Arrow."""
    where = f" WHERE {_MONTH} = '{month}'" if month else ""  # month comes from event_months, never from input
    return con.sql(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events{where}").pl()


def write_atomically(frame: pl.DataFrame, directory: Path, name: str) -> list[str]:
    """`name.parquet` (exact) and `name.csv` (formula-safe, `csv_safety`), each written to a hidden
    temporary file and renamed into place."""
    written = []
    for suffix, writer in ((".parquet", frame.write_parquet), (".csv", csv_safe(frame).write_csv)):
        final = directory / f"{name}{suffix}"
        temporary = directory / f".{name}{suffix}.tmp-{os.getpid()}"
        writer(temporary)
        os.replace(temporary, final)
        written.append(final.name)
    return written


@dataclass(frozen=True)
class BillingInputs:
    """What statements and budget status need besides events: tenants' terms, credits, limits."""

    tenants: dict[str, Tenant]
    credits: list[Credit]
    limits: list[LimitRule] = field(default_factory=list)
    closed: dict[tuple[str, str], dict] = field(default_factory=dict)  # (period, tenant) -> frozen statement


def load_billing_inputs(data_dir: Path) -> BillingInputs:
    """`tenants.csv` and the credits in the control store (read-only: control.db or PostgreSQL)."""
    from proxy.control import ControlStore, is_postgres
    from proxy.settings import load_settings

    credits, closed = [], {}
    db = load_settings(data_dir).control_target
    if is_postgres(db) or db.exists():
        store = ControlStore(db, None, read_only=True)
        try:
            rows = store.credit_rows()
            frozen = store.closed_statements()
        finally:
            store.close()
        credits = [Credit(t, Decimal(a), datetime.fromisoformat(c.replace("Z", "+00:00"))) for t, a, _, c in rows]
        closed = {(period, tenant): json.loads(body) for period, tenant, body in frozen}
    files = load_policy_files(data_dir)
    return BillingInputs(files.tenants, credits, files.limits, closed)


def statement_frame(usage_frame: pl.DataFrame, billing: BillingInputs, until: str) -> pl.DataFrame:
    """Statements from `period_usage` rows (per month and tenant) and the billing inputs."""
    usage = [PeriodUsage(r["month"], r["tenant"], r["unified_cost_usd"] or Decimal(0),
                         r["byok_cost_usd"] or Decimal(0), r["unpriced_requests"])
             for r in usage_frame.iter_rows(named=True)]
    rows = [s.row() for s in statements(usage, billing.credits, billing.tenants, until, billing.closed)]
    return pl.DataFrame(rows, schema=STATEMENT_SCHEMA, orient="row") if rows else pl.DataFrame(schema=STATEMENT_SCHEMA)


def build_reports(con: duckdb.DuckDBPyConnection, reports_dir: Path, billing: BillingInputs | None = None) -> dict:
    """Build every report from the events (and the statements, given the billing inputs);
    return the manifest that was written."""
    started = time.perf_counter()
    built_at = datetime.now(UTC).isoformat()  # before reading: the reports cover what existed then
    reports_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"built_at": built_at, "code_version": code_version(), "source_rows": 0, "newest_event": None,
                      "reports": {}}
    # Every report groups within a month, so months are processed one at a time: memory stays at one
    # month of events however long the history is.
    parts: dict[str, list[pl.DataFrame]] = {name: [] for name in (*REPORTS, "period_usage", "budget_status")}
    current = built_at[:7]
    for month in event_months(con):
        events = load_events(con, month)
        manifest["source_rows"] += events.height
        manifest["newest_event"] = events["ts"].max().isoformat()
        lazy = events.lazy()
        for name, report in REPORTS.items():
            parts[name].append(report(lazy).collect())
        parts["period_usage"].append(period_usage(lazy).collect())
        if billing is not None and month == current:
            parts["budget_status"].append(budget_status(lazy, billing.limits, datetime.fromisoformat(built_at)))
        del events, lazy
    empty = con.sql(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events LIMIT 0").pl().lazy()  # the schema only
    frames = {name: pl.concat(parts[name]) if parts[name] else report(empty).collect()
              for name, report in REPORTS.items()}
    if billing is not None:
        usage = pl.concat(parts["period_usage"]) if parts["period_usage"] else period_usage(empty).collect()
        frames["statements"] = statement_frame(usage, billing, current)
        frames["budget_status"] = (parts["budget_status"][0] if parts["budget_status"]
                                   else budget_status(empty, billing.limits, datetime.fromisoformat(built_at)))
    for name, frame in frames.items():
        manifest["reports"][name] = {"rows": frame.height, "built_at": datetime.now(UTC).isoformat(),
                                     "files": write_atomically(frame, reports_dir, name)}
    manifest["build_seconds"] = round(time.perf_counter() - started, 3)
    temporary = reports_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, reports_dir / MANIFEST)
    return manifest


def apply_retention(con: duckdb.DuckDBPyConnection, retention_days: int, closed_periods: set[str],
                    now: datetime) -> int:
    """Delete events older than `retention_days`, but only from closed periods (their statements are
    frozen); call it after the reports are built. Returns the number of events deleted."""
    if not closed_periods:
        return 0
    cutoff = now - timedelta(days=retention_days)
    periods = sorted(closed_periods)
    where = "ts < ? AND strftime(ts AT TIME ZONE 'UTC', '%Y-%m') IN ?"
    count = con.execute(f"SELECT count(*) FROM events WHERE {where}", [cutoff, periods]).fetchone()[0]
    if count:
        con.execute(f"DELETE FROM events WHERE {where}", [cutoff, periods]).fetchall()
    return count


def build_and_retain(con: duckdb.DuckDBPyConnection, data_dir: Path, reports_dir: Path, retention_days: int) -> dict:
    """The scheduled job (the gateway's with the DuckDB sink, the pipeline's with segments): build the
    reports in a child process from a snapshot taken through `con`, then apply retention (only now
    that every report that needed the old events is built). Returns the manifest."""
    billing = load_billing_inputs(data_dir)
    manifest = build_in_child(con, data_dir, reports_dir)
    deleted = apply_retention(con, retention_days, {period for period, _ in billing.closed}, datetime.now(UTC))
    if deleted:
        log.info("retention: deleted %d events older than %d days from closed periods", deleted, retention_days)
    return manifest


def snapshot_events(con: duckdb.DuckDBPyConnection, reports_dir: Path) -> Path:
    """The columns the reports read, of every event, as one Parquet file (DuckDB streams it)."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    path = reports_dir / SNAPSHOT
    quoted = str(path).replace("'", "''")
    con.execute(f"COPY (SELECT {', '.join(EVENT_COLUMNS)} FROM events) TO '{quoted}' (FORMAT parquet)").fetchall()
    return path


def build_from_snapshot(snapshot: Path, data_dir: Path, reports_dir: Path) -> dict:
    """`build_reports` over a Parquet snapshot of the events (in the process that calls it)."""
    con = duckdb.connect(":memory:", config=DUCKDB_CONFIG)
    try:
        con.read_parquet(str(snapshot)).create_view("events")
        return build_reports(con, reports_dir, load_billing_inputs(data_dir))
    finally:
        con.close()


def build_in_child(con: duckdb.DuckDBPyConnection, data_dir: Path, reports_dir: Path, timeout_s: float = 600) -> dict:
    """Snapshot the events through `con`, build the reports in a child process, return its manifest."""
    return build_snapshot_in_child(snapshot_events(con, reports_dir), data_dir, reports_dir, timeout_s)


def build_snapshot_in_child(snapshot: Path, data_dir: Path, reports_dir: Path, timeout_s: float = 600) -> dict:
    """Build the reports from a snapshot (`snapshot_events`) in a child process, then delete the snapshot."""
    try:
        child = subprocess.run([sys.executable, "-m", "analytics.jobs", str(snapshot), str(data_dir), str(reports_dir)],
                               capture_output=True, text=True, timeout=timeout_s)
    finally:
        snapshot.unlink(missing_ok=True)
    if child.returncode != 0:
        raise RuntimeError(f"report build failed (exit {child.returncode}): {child.stderr.strip()[-2000:]}")
    return json.loads(child.stdout)


def read_manifest(reports_dir: Path) -> dict | None:
    path = reports_dir / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def run_now(data_dir: Path, events_db: Path, reports_dir: Path, wait_s: float = 120) -> tuple[dict, str]:
    """Build now: directly if no gateway holds `events.duckdb`, else through the running gateway.

    Returns the manifest and how it was built ("direct" or "gateway").
    """
    try:
        con = duckdb.connect(str(events_db), read_only=True, config=DUCKDB_CONFIG)
    except duckdb.IOException:
        return _ask_gateway(reports_dir, wait_s), "gateway"
    try:
        return build_reports(con, reports_dir, load_billing_inputs(data_dir)), "direct"
    finally:
        con.close()


def _ask_gateway(reports_dir: Path, wait_s: float) -> dict:
    return ask_running(reports_dir, wait_s)


def ask_running(reports_dir: Path, wait_s: float) -> dict:
    """Ask the process that runs the report schedule (the gateway, or the pipeline with segments) to
    build now, through the trigger file it polls; wait for the new manifest."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    asked_at = datetime.now(UTC).isoformat()
    (reports_dir / TRIGGER).write_text(asked_at)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        manifest = read_manifest(reports_dir)
        if manifest and manifest["built_at"] >= asked_at:
            return manifest
        time.sleep(0.2)
    raise TimeoutError("the running gateway (or pipeline) did not build the reports in time; check its log")


if __name__ == "__main__":  # the gateway's report child: python -m analytics.jobs SNAPSHOT DATA_DIR REPORTS_DIR
    snapshot_path, data, reports = (Path(arg) for arg in sys.argv[1:4])
    print(json.dumps(build_from_snapshot(snapshot_path, data, reports)))
