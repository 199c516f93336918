"""Altair charts for the dashboard. Inputs are small frames from `dashboard.figures`; money arrives
here as floats (`cost_usd`) because a chart only draws it — the tables keep the exact Decimals."""

from __future__ import annotations

import altair as alt
import polars as pl

DOLLARS = alt.Axis(format="$,.2f", title="spend (USD)")
LEGEND = alt.Legend(labelLimit=320, orient="bottom", columns=3)


def stacked_spend(daily: pl.DataFrame, dimension: str, title: str) -> alt.Chart:
    """Daily spend as stacked bars, one colour per value of `dimension`."""
    return (alt.Chart(daily.to_pandas(), title=title)
            .mark_bar()
            .encode(x=alt.X("yearmonthdate(day):T", title="day (UTC)"),
                    y=alt.Y("sum(cost_usd):Q", axis=DOLLARS),
                    color=alt.Color(f"{dimension}:N", title=dimension.replace("_", " "), legend=LEGEND),
                    tooltip=[alt.Tooltip("yearmonthdate(day):T", title="day"), alt.Tooltip(f"{dimension}:N"),
                             alt.Tooltip("sum(cost_usd):Q", format="$,.4f", title="spend"),
                             alt.Tooltip("sum(requests):Q", format=",", title="requests")]))


def burn(cumulative: pl.DataFrame, limit_usd: float | None, title: str) -> alt.Chart:
    """Running spend through the month, with the monthly budget as a rule when there is one."""
    line = (alt.Chart(cumulative.to_pandas(), title=title).mark_area(line=True, opacity=0.3)
            .encode(x=alt.X("yearmonthdate(day):T", title="day (UTC)"), y=alt.Y("spent_usd:Q", axis=DOLLARS),
                    tooltip=[alt.Tooltip("yearmonthdate(day):T", title="day"),
                             alt.Tooltip("spent_usd:Q", format="$,.2f", title="spent so far")]))
    if limit_usd is None:
        return line
    rule = (alt.Chart(pl.DataFrame({"limit": [limit_usd]}).to_pandas()).mark_rule(color="firebrick", strokeDash=[6, 3])
            .encode(y="limit:Q", tooltip=[alt.Tooltip("limit:Q", format="$,.2f", title="monthly budget")]))
    return line + rule


def counts_over_time(daily: pl.DataFrame, colour: str, title: str) -> alt.Chart:
    """Daily counts as stacked bars (denials per outcome, for instance)."""
    return (alt.Chart(daily.to_pandas(), title=title).mark_bar()
            .encode(x=alt.X("yearmonthdate(day):T", title="day (UTC)"), y=alt.Y("sum(count):Q", title="requests"),
                    color=alt.Color(f"{colour}:N", legend=LEGEND),
                    tooltip=[alt.Tooltip("yearmonthdate(day):T", title="day"), f"{colour}:N",
                             alt.Tooltip("sum(count):Q", format=",", title="requests")]))


def top_bars(frame: pl.DataFrame, label: str, value: str, title: str) -> alt.Chart:
    """Horizontal bars, largest first (top spenders)."""
    return (alt.Chart(frame.to_pandas(), title=title).mark_bar()
            .encode(y=alt.Y(f"{label}:N", sort="-x", title=None), x=alt.X(f"{value}:Q", axis=DOLLARS),
                    tooltip=[f"{label}:N", alt.Tooltip(f"{value}:Q", format="$,.4f", title="spend")]))
