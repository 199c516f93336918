"""What the dashboard reads: report snapshots, the policy files, and the control store — all read-only.

It never opens `events.duckdb` (the gateway holds it). Reports are replaced atomically by renames,
so each Parquet file is read into memory in one go and parsed from the bytes: the file a path names
may be swapped between two reads, the bytes already read cannot. Loads are cached on what changes
them — the manifest's `built_at` for reports, the files' hashes for policy — so a new report build
or a policy edit shows on the next page view without a restart.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from analytics.jobs import MANIFEST
from policy.files import PolicyFiles, Problem, file_hashes
from policy.loader import check_policy_set
from proxy.control import ControlStore, ControlUnavailable, ProviderKey, is_postgres
from proxy.settings import SettingsError, load_settings

REPORT_NAMES = ("tenant_costs", "user_costs", "denials", "statements", "budget_status")


@dataclass(frozen=True)
class Reports:
    """One build of the reports: the manifest and a frame per report (None when not built)."""

    manifest: dict | None
    frames: dict[str, pl.DataFrame | None] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # report -> why it could not be read

    @property
    def built_at(self) -> datetime | None:
        return datetime.fromisoformat(self.manifest["built_at"]) if self.manifest else None

    @property
    def newest_event(self) -> datetime | None:
        newest = (self.manifest or {}).get("newest_event")
        return datetime.fromisoformat(newest) if newest else None

    def frame(self, name: str) -> pl.DataFrame | None:
        return self.frames.get(name)

    @property
    def is_empty(self) -> bool:
        """Built, but from no events at all."""
        return self.manifest is not None and not self.manifest.get("source_rows")


def read_manifest(reports_dir: Path) -> dict | None:
    """The manifest, or None when the reports were never built (or it cannot be parsed yet)."""
    try:
        return json.loads((reports_dir / MANIFEST).read_bytes())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_reports(reports_dir: Path, manifest: dict | None) -> Reports:
    """Every report of this build, parsed from bytes read in one go."""
    frames: dict[str, pl.DataFrame | None] = {}
    unreadable: dict[str, str] = {}
    for name in REPORT_NAMES:
        path = reports_dir / f"{name}.parquet"
        try:
            frames[name] = pl.read_parquet(io.BytesIO(path.read_bytes()))
        except FileNotFoundError:
            frames[name] = None
        except Exception as exc:  # a damaged file must not take the whole dashboard down
            frames[name], unreadable[name] = None, f"{type(exc).__name__}: {exc}"
    return Reports(manifest, frames, unreadable)


@dataclass(frozen=True)
class KeyInfo:
    """A provider key as the dashboard may show it: never the secret, not even its fingerprint."""

    key_id: str
    provider: str
    owner: str
    billing_mode: str
    status: str
    health: str


@dataclass(frozen=True)
class ControlSnapshot:
    """The parts of `control.db` the dashboard shows."""

    keys: list[KeyInfo] = field(default_factory=list)
    credits: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(
        schema={"tenant": pl.String, "amount_usd": pl.String, "note": pl.String, "created_at": pl.String}))
    last_refused: dict | None = None  # the newest `policy.refused` audit entry
    last_reloaded: dict | None = None  # the newest `policy.reloaded` audit entry
    closed_periods: tuple[str, ...] = ()
    unavailable: str | None = None  # why the control store could not be read (PostgreSQL down), or None


def control_location(data_dir: Path) -> str:
    """The deployment's control store ([control] url): a PostgreSQL URL, or control.db's path."""
    try:
        return str(load_settings(data_dir).control_target)
    except SettingsError:
        return str(data_dir / "control.db")


def read_control(db: Path | str) -> ControlSnapshot:
    """Keys (no secrets), credits, policy reload history and closed periods, opened read-only (control.db's
    path or a PostgreSQL URL)."""
    target = db if is_postgres(db) else Path(db)
    if not is_postgres(target) and not target.exists():
        return ControlSnapshot()
    try:
        store = ControlStore(target, None, read_only=True)
    except ControlUnavailable as exc:  # the pages still show the reports; the sidebar says what is missing
        return ControlSnapshot(unavailable=str(exc))
    try:
        keys = [KeyInfo(k.key_id, k.provider, k.owner, "byok" if k.owner_tenant else "unified", k.status, k.health)
                for k in store.list_keys()]
        credits = pl.DataFrame(store.credit_rows(), orient="row",
                               schema={"tenant": pl.String, "amount_usd": pl.String, "note": pl.String,
                                       "created_at": pl.String})
        last = {action: _last_audit(store, action) for action in ("policy.refused", "policy.reloaded")}
        closed = tuple(store.closed_periods())
    except ControlUnavailable as exc:
        return ControlSnapshot(unavailable=str(exc))
    finally:
        store.close()
    return ControlSnapshot(keys, credits, last["policy.refused"], last["policy.reloaded"], closed)


def _last_audit(store: ControlStore, action: str) -> dict | None:
    entry = store.last_audit(action)
    if entry is None:
        return None
    return {"seq": entry["seq"], "ts": entry["ts"], "version": entry["target"], "details": json.loads(entry["details"])}


@dataclass(frozen=True)
class PolicyView:
    """The policy files as they are on disk now, with every problem the gateway would report."""

    files: PolicyFiles
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


def read_policy(data_dir: Path, keys: list[KeyInfo]) -> PolicyView:
    """Validate the files exactly as `tollway policy check` does, key routes included."""
    known = {k.key_id: ProviderKey(k.key_id, k.provider, None if k.owner == "operator" else k.owner, "", k.status,
                                   "", "", k.health) for k in keys}
    files, _, problems = check_policy_set(data_dir, known)
    return PolicyView(files, problems)


def policy_fingerprint(data_dir: Path) -> str:
    """Changes whenever a policy file, tenants.csv or pricing.csv changes."""
    hashes = file_hashes(data_dir)
    pricing = data_dir / "pricing.csv"
    stamp = pricing.stat().st_mtime_ns if pricing.exists() else 0
    return json.dumps(hashes, sort_keys=True) + str(stamp)


def control_fingerprint(db: Path | str) -> str:
    """Changes whenever another process commits to `control.db` (WAL included), or to what the dashboard shows
    of a PostgreSQL control store (its change counter and the audit log's newest entry)."""
    if is_postgres(db):
        try:
            store = ControlStore(db, None, read_only=True)
        except ControlUnavailable as exc:
            return f"unreachable: {exc}"
        try:
            return f"{store.data_version()}:{store.audit_high_water()}"
        finally:
            store.close()
    db = Path(db)
    parts = [db, db.with_name(db.name + "-wal")]
    return ";".join(f"{p.stat().st_mtime_ns}:{p.stat().st_size}" if p.exists() else "-" for p in parts)


def report_interval_s(data_dir: Path) -> int:
    """How often the gateway rebuilds reports (from tollway.toml), for the staleness check."""
    try:
        return load_settings(data_dir).pipeline.report_interval_s
    except SettingsError:
        return 60


def staleness(reports: Reports, interval_s: int, now: datetime | None = None) -> float | None:
    """Seconds the reports are past due (built more than three intervals plus a minute ago), else None."""
    if reports.built_at is None:
        return None
    age = ((now or datetime.now(UTC)) - reports.built_at).total_seconds()
    overdue = age - (3 * interval_s + 60)
    return age if overdue > 0 else None
