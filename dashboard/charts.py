"""Altair charts for the dashboard. Inputs are small frames from `dashboard.figures`; money arrives
here twice: as floats (`cost_usd`, `spent_usd`) that only set a mark's size, and as text formatted by
`figures.money` for tooltips, so a tooltip reads exactly like a card or a table cell.

Days are an ordinal axis with one band, and one label, per calendar day from the first day shown to
the last (a day without traffic keeps its empty band): one day of data is one labelled bar, never a
time axis that repeats the same date at every few hours.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from dashboard import figures

LEGEND = alt.Legend(labelLimit=320, orient="bottom", columns=3)
DAY_LABEL = "utcFormat(toDate(datum.value), '%b %d')"  # `2026-03-05` → `Mar 05`


def _source(frame: pl.DataFrame):
    """The frame as Altair takes it, days as ISO strings (the ordinal day axis's values)."""
    if "day" in frame.columns:
        frame = frame.with_columns(pl.col("day").dt.strftime("%Y-%m-%d"))
    return frame.to_pandas()


def _days(frame: pl.DataFrame) -> alt.X:
    days = [d.isoformat() for d in figures.days_between(frame)]
    return alt.X("day:O", title="day (UTC)", scale=alt.Scale(domain=days),
                 axis=alt.Axis(labelExpr=DAY_LABEL, labelAngle=-45 if len(days) > 10 else 0))


def _dollars(largest: float | None) -> alt.Axis:
    """A money axis whose ticks all share one format chosen by the data's magnitude."""
    return alt.Axis(format=figures.money_axis_format(largest), title="spend (USD)")


def _daily_total_max(daily: pl.DataFrame, value: str) -> float | None:
    return daily.group_by("day").agg(pl.col(value).sum())[value].max() if not daily.is_empty() else None


def stacked_spend(daily: pl.DataFrame, dimension: str, title: str) -> alt.Chart:
    """Daily spend as stacked bars, one colour per value of `dimension` (rows of `figures.spend_by`)."""
    return (alt.Chart(_source(daily), title=title)
            .mark_bar()
            .encode(x=_days(daily),
                    y=alt.Y("cost_usd:Q", stack="zero", axis=_dollars(_daily_total_max(daily, "cost_usd"))),
                    color=alt.Color(f"{dimension}:N", title=dimension.replace("_", " "), legend=LEGEND),
                    tooltip=[alt.Tooltip("day:O", title="day"), alt.Tooltip(f"{dimension}:N"),
                             alt.Tooltip("spend:N", title="spend"),
                             alt.Tooltip("requests:Q", format=",", title="requests")]))


def burn(cumulative: pl.DataFrame, limit_usd: float | None, title: str) -> alt.Chart:
    """Running spend through the month (`figures.cumulative_spend`), with the monthly budget as a rule
    when there is one."""
    largest = max(filter(None, [cumulative["spent_usd"].max(), limit_usd]), default=None)
    line = (alt.Chart(_source(cumulative), title=title).mark_area(line=True, opacity=0.3)
            .encode(x=_days(cumulative), y=alt.Y("spent_usd:Q", axis=_dollars(largest)),
                    tooltip=[alt.Tooltip("day:O", title="day"), alt.Tooltip("spent:N", title="spent so far")]))
    if limit_usd is None:
        return line
    rule = (alt.Chart(pl.DataFrame({"limit": [limit_usd], "budget": [figures.money(limit_usd)]}).to_pandas())
            .mark_rule(color="firebrick", strokeDash=[6, 3])
            .encode(y="limit:Q", tooltip=[alt.Tooltip("budget:N", title="monthly budget")]))
    return line + rule


def counts_over_time(daily: pl.DataFrame, colour: str, title: str) -> alt.Chart:
    """Daily counts as stacked bars (denials per outcome, for instance)."""
    return (alt.Chart(_source(daily), title=title).mark_bar()
            .encode(x=_days(daily),
                    y=alt.Y("count:Q", stack="zero", axis=alt.Axis(title="requests", format=",d", tickMinStep=1)),
                    color=alt.Color(f"{colour}:N", legend=LEGEND),
                    tooltip=[alt.Tooltip("day:O", title="day"), f"{colour}:N",
                             alt.Tooltip("count:Q", format=",", title="requests")]))


def top_bars(bars: pl.DataFrame, title: str) -> alt.Chart:
    """Horizontal bars, largest first (`figures.spender_bars`)."""
    return (alt.Chart(bars.to_pandas(), title=title).mark_bar()
            .encode(y=alt.Y("user:N", sort="-x", title=None),
                    x=alt.X("cost_usd:Q", axis=_dollars(bars["cost_usd"].max())),
                    tooltip=["user:N", alt.Tooltip("spend:N", title="spend")]))
