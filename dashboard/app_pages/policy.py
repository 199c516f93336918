"""Policy: the rules in force, their validation status, the last refused edit, denials over time."""

import polars as pl
import streamlit as st

from dashboard import charts, figures
from dashboard.shell import Context, context, reports_readable, scope_label, show_table, warn_if_stale


def render(ctx: Context) -> None:
    st.title("Policy")
    st.caption(scope_label(ctx))
    _status(ctx)
    files = ctx.policy.files
    access, roles, routes, limits = st.tabs(["Access rules", "Roles", "Routes", "Limits"])
    with access:
        _table([{"line": r.line, "subject": r.subject, "tenant": r.tenant, "models": r.model_glob,
                 "effect": r.effect} for r in files.access if _mine(ctx, r.tenant)], "policy/access.csv")
    with roles:
        _table([{"line": r.line, "user": r.user, "role": r.role, "tenant": r.tenant}
                for r in files.roles if _mine(ctx, r.tenant)], "policy/access.csv (g rows)")
    with routes:
        _table([{"line": r.line, "tenant": r.tenant, "models": r.model_glob, "keys": " → ".join(r.key_ids)}
                for r in files.routes if _mine(ctx, r.tenant)], "policy/routes.csv")
    with limits:
        _table([{"line": r.line, "tenant": r.tenant, "subject": r.subject, "metric": r.metric, "window": r.window,
                 "limit": str(r.limit)} for r in files.limits if _mine(ctx, r.tenant)], "policy/limits.csv")
    _denials(ctx)


def _mine(ctx: Context, tenant: str) -> bool:
    return ctx.tenant is None or tenant in (ctx.tenant, "*")


def _table(rows: list[dict], source: str) -> None:
    st.caption(f"From `{source}`" + (", rules for `*` apply to every tenant." if rows else ""))
    if rows:
        show_table(pl.DataFrame(rows))
    else:
        st.info(f"No rules in `{source}` for this selection.")


def _status(ctx: Context) -> None:
    errors, warnings = ctx.policy.errors, ctx.policy.warnings
    if errors:
        st.error(f"**The policy files on disk have {len(errors)} error(s).** The gateway refuses such an edit and "
                 "keeps the last valid version in force (a gateway starting on these files refuses to start). Fix them, "
                 "then `tollway policy check`.", icon=":material/block:")
        st.code("\n".join(str(p) for p in errors), language=None)
    else:
        st.success("The policy files are valid" + (f" ({len(warnings)} warning(s))." if warnings else "."), icon=":material/check_circle:")
    if warnings:
        with st.expander(f"Warnings ({len(warnings)})"):
            st.code("\n".join(str(p) for p in warnings), language=None)
    refused, reloaded = ctx.control.last_refused, ctx.control.last_reloaded
    if refused:
        superseded = reloaded is not None and reloaded["seq"] > refused["seq"]
        state = "a valid version has loaded since" if superseded else "the gateway still runs the version before it"
        st.markdown(f"**Last refused edit:** {refused['ts']} ({state})")
        st.code("\n".join(refused["details"].get("errors", [])), language=None)
    if reloaded:
        st.caption(f"Last reload: {reloaded['ts']}, version `{reloaded['version']}`.")


def _denials(ctx: Context) -> None:
    st.subheader("Denials")
    if ctx.reports.manifest is None:
        st.info("No reports yet: `tollway report run` builds them (the gateway does every "
                f"{ctx.interval_s} s).")
        return
    if not reports_readable(ctx, "denials"):
        return
    warn_if_stale(ctx)
    refused = ctx.frame("denials")
    daily = figures.denials_over_time(refused, ctx.period, ctx.tenant)
    if daily.is_empty():
        st.info(f"No request was refused in {ctx.period} for {ctx.tenant or 'any tenant'}.")
        return
    st.altair_chart(charts.counts_over_time(daily, "outcome", "Refused requests per day"), width="stretch")
    show_table(figures.denials_by_model(refused, ctx.period, ctx.tenant))


render(context())
