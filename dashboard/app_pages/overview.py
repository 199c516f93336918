"""Overview: the month's spend, volume, error and refusal rates, latency, trend and freshness."""

import polars as pl
import streamlit as st

from dashboard import charts, figures, shell
from dashboard.shell import Context

ERRORS_HELP = "Admitted requests that failed: provider errors, timeouts, internal errors, cancelled calls."
REFUSALS_HELP = ("Requests the gateway refused: policy denials (a model not allowed, or misspelt), rate limits, "
                 "budgets, bad requests.")


def render(ctx: Context) -> None:
    st.title("Overview")
    st.caption(shell.scope_label(ctx))
    if not shell.require_reports(ctx, "tenant_costs", "denials"):
        return
    costs, refused = ctx.frame("tenant_costs"), ctx.frame("denials")
    figure = figures.overview(costs, refused, ctx.period, ctx.tenant, ctx.today.date())
    _headline(ctx, figure)
    if figure.unpriced_requests:
        _unpriced(ctx, costs, figure)
    rows = figures.scoped(costs, ctx.period, ctx.tenant)
    if rows.is_empty():
        st.info(f"No requests in {ctx.period} for {ctx.tenant or 'any tenant'}. Pick another period or tenant.")
        return
    dimension = "provider" if ctx.tenant else "tenant"
    st.altair_chart(charts.stacked_spend(figures.spend_by(rows, dimension), dimension,
                                         f"Daily spend by {dimension}"), width="stretch")
    st.subheader(f"Spend by {'model' if ctx.tenant else 'tenant'}")
    table = figures.spend_table(rows, figures.scoped(refused, ctx.period, ctx.tenant),
                                "model" if ctx.tenant else "tenant")
    shell.show_table(table, errors=st.column_config.NumberColumn(format="localized", help=ERRORS_HELP),
                     refusals=st.column_config.NumberColumn(format="localized", help=REFUSALS_HELP))


def _unpriced(ctx: Context, costs: pl.DataFrame, figure: figures.Overview) -> None:
    """The warning and the models to price, so an operator knows what to add."""
    st.warning(f"**{figures.count(figure.unpriced_requests)} request(s) used a model with no price** (in "
               "neither the price book nor `pricing.csv`): their cost is unknown and left out of every total. "
               "The models are listed below.", icon=":material/price_change:")
    shell.show_table(figures.unpriced_models(costs, ctx.period, ctx.tenant))
    st.caption("To price a model, add a row to `pricing.csv` (the operator's overrides: `provider`, `model` "
               "without the `provider/` prefix, `effective_from`, `input_usd_per_mtok`, `output_usd_per_mtok`, "
               "…) or upgrade the price book. `tollway pricing check` lists the same models from the events.")


def _headline(ctx: Context, figure: figures.Overview) -> None:
    spend, today, volume, unpriced = st.columns(4)
    spend.metric("Spend", figures.money(figure.spend),
                 None if figure.trend is None else f"{figure.trend:+.1f}%", delta_color="off",
                 help=f"Known provider cost at list price. {_comparison(ctx, figure)}")
    current = ctx.today.strftime("%Y-%m") == ctx.period
    today.metric("Spend today (UTC)", figures.money(figure.spend_today) if current else figures.MISSING,
                 help=None if current else "Only shown for the current month.")
    volume.metric("Requests", figures.count(figure.requests))
    unpriced.metric("Unpriced requests", figures.count(figure.unpriced_requests),
                    help="Requests whose model has no price in pricing.csv: their cost is unknown.")
    errors, refusals, p50, p95 = st.columns(4)
    errors.metric("Error rate", figures.percent(figure.error_rate),
                  help=f"{ERRORS_HELP} As a share of requests; the table's Errors column counts the same.")
    refusals.metric("Refusal rate", figures.percent(figure.refusal_rate),
                    help=f"{REFUSALS_HELP} As a share of requests; the table's Refusals column counts the same.")
    weighted = "Request-weighted over the per-day, per-model percentiles of `tenant_costs`."
    p50.metric("Latency p50", _ms(figure.p50_latency_ms), help=weighted)
    p95.metric("Latency p95", _ms(figure.p95_latency_ms), help=weighted)
    if figure.previous_spend or not figure.previous_covered:
        st.caption(_comparison(ctx, figure))


def _comparison(ctx: Context, figure: figures.Overview) -> str:
    """What the spend change compares, or why no change is shown."""
    before = figures.previous_period(ctx.period)
    start = figure.history_start
    if start is None or start.strftime("%Y-%m") > before:
        return f"No spend change shown: the history does not cover the previous period ({before})."
    if not figure.previous_covered:
        return (f"No spend change shown: the previous period ({before}) is only partly covered "
                f"(the history starts {start}).")
    compared = f"the same {figure.compared_days} days of {before}" if figure.compared_days else before
    return f"Spend change is against {compared} ({figures.money(figure.previous_spend)})."


def _ms(value: float | None) -> str:
    return figures.MISSING if value is None else f"{value:,.0f} ms"


render(shell.context())
