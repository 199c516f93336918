"""What every page shares: the cached loads, the period and tenant filters, and the plain-words
messages for missing, empty, damaged or stale reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import streamlit as st

from dashboard import figures
from dashboard.data import (
    ControlSnapshot,
    PolicyView,
    Reports,
    control_fingerprint,
    control_location,
    policy_fingerprint,
    read_control,
    read_manifest,
    read_policy,
    read_reports,
    report_interval_s,
    staleness,
)
from proxy.settings import resolve_data_dir

ALL_TENANTS = "All tenants"
CONTEXT_KEY = "_tollway_context"


@dataclass(frozen=True)
class Context:
    data_dir: Path
    reports: Reports
    control: ControlSnapshot
    policy: PolicyView
    period: str
    tenant: str | None  # None: every tenant
    tenants: list[str]
    stale_for_s: float | None
    interval_s: int
    today: datetime

    def frame(self, name: str) -> pl.DataFrame | None:
        return self.reports.frame(name)


# The loads are cached on what changes them; frames are immutable, so one copy serves every session.
@st.cache_resource(max_entries=4, show_spinner="Loading reports…")
def _reports(reports_dir: str, built_at: str | None) -> Reports:
    return read_reports(Path(reports_dir), read_manifest(Path(reports_dir)))


@st.cache_resource(max_entries=4, show_spinner=False)
def _control(db: str, fingerprint: str) -> ControlSnapshot:
    return read_control(db)


@st.cache_resource(max_entries=4, show_spinner=False)
def _policy(data_dir: str, fingerprint: str, control_fp: str) -> PolicyView:
    return read_policy(Path(data_dir), _control(control_location(Path(data_dir)), control_fp).keys)


def build_context() -> Context:
    """Load everything (from cache when unchanged) and draw the sidebar filters."""
    data_dir = resolve_data_dir(None)
    reports_dir = data_dir / "reports"
    manifest = read_manifest(reports_dir)
    reports = _reports(str(reports_dir), manifest["built_at"] if manifest else None)
    db = control_location(data_dir)
    control_fp = control_fingerprint(db)
    control = _control(str(db), control_fp)
    policy = _policy(str(data_dir), policy_fingerprint(data_dir), control_fp)
    now = datetime.now(UTC)
    interval = report_interval_s(data_dir)

    frames = [reports.frame(n) for n in ("tenant_costs", "statements", "user_costs", "denials")]
    periods = figures.periods(*frames) or [now.strftime("%Y-%m")]
    tenants = figures.tenants(*frames, known=tuple(policy.files.tenants))
    with st.sidebar:
        period = st.selectbox("Period (UTC month)", periods, key="period",
                              help="Every page shows this month; the newest is first.")
        choice = st.selectbox("Tenant", [ALL_TENANTS, *tenants], key="tenant")
        _freshness_caption(reports, now)
        if control.unavailable:
            st.warning(f"The control store cannot be read ({control.unavailable}): provider keys, credits and "
                       "policy history are not shown until it answers. Reports are shown as built.")
        st.caption(f"Deployment: `{data_dir}`")
    context = Context(data_dir, reports, control, policy, period, None if choice == ALL_TENANTS else choice,
                      tenants, staleness(reports, interval, now), interval, now)
    st.session_state[CONTEXT_KEY] = context
    return context


def context() -> Context:
    """The context the entrypoint built for this run."""
    return st.session_state[CONTEXT_KEY]


def _freshness_caption(reports: Reports, now: datetime) -> None:
    if reports.built_at is None:
        st.caption("Reports: not built yet")
        return
    age = figures.duration((now - reports.built_at).total_seconds())
    newest = reports.newest_event.strftime("%Y-%m-%d %H:%M UTC") if reports.newest_event else "none"
    st.caption(f"Reports built {age} ago · newest event {newest}")


def require_reports(ctx: Context, *names: str) -> bool:
    """Say plainly why there is nothing to show, and return False, when the reports this page needs
    are missing, damaged or empty; warn (and go on) when they are stale."""
    if ctx.reports.manifest is None:
        st.info("**No reports yet.** They are built from the gateway's events every "
                f"{ctx.interval_s} s while `tollway serve` runs, or now with "
                f"`tollway report run --data-dir {ctx.data_dir}`. Then reload this page.", icon=":material/inbox:")
        return False
    if not reports_readable(ctx, *names):
        return False
    warn_if_stale(ctx)
    if ctx.reports.is_empty:
        st.info("**No traffic recorded yet.** The reports are built but no request has gone through the "
                "gateway. Point an SDK at it (see the README) and the figures appear here.", icon=":material/inbox:")
        return False
    return True


def reports_readable(ctx: Context, *names: str) -> bool:
    """Say which of these reports are damaged or missing; True when every one can be shown."""
    for name, why in ctx.reports.unreadable.items():
        if name in names:
            st.error(f"The `{name}` report could not be read ({why}). Rebuild it with `tollway report run`.",
                     icon=":material/error:")
    missing = [n for n in names if ctx.frame(n) is None and n not in ctx.reports.unreadable]
    if missing:
        st.warning(f"Report(s) {', '.join(f'`{n}`' for n in missing)} are missing from `reports/`: "
                   "run `tollway report run` to build them.", icon=":material/warning:")
    return all(ctx.frame(n) is not None for n in names)


def warn_if_stale(ctx: Context) -> None:
    if ctx.stale_for_s is not None:
        st.warning(f"**These reports are stale:** built {figures.duration(ctx.stale_for_s)} ago, while the gateway "
                   f"rebuilds them every {ctx.interval_s} s. Is `tollway serve` running? "
                   "`tollway report run` rebuilds them now.", icon=":material/schedule:")


def show_table(frame: pl.DataFrame, **config) -> None:
    """Draw a table as every page does: `figures.for_display` (money by magnitude, human headers, `—`
    for missing text), money right-aligned, counts with thousands separators, `—` for missing numbers.
    `config`: column configs by the frame's own column names, over those defaults."""
    defaults = {}
    for name, dtype in frame.schema.items():
        if figures.is_money(name):
            defaults[name] = st.column_config.TextColumn(alignment="right")
        elif dtype.is_integer() and name != "line":
            defaults[name] = st.column_config.NumberColumn(format="localized")
    st.dataframe(figures.for_display(frame), hide_index=True, placeholder=figures.MISSING,
                 column_config={figures.label(n): c for n, c in {**defaults, **config}.items()})


def scope_label(ctx: Context) -> str:
    return f"{ctx.tenant or 'all tenants'} · {ctx.period}"
