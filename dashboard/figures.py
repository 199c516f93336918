"""The dashboard's numbers: pure functions over report frames (no Streamlit, no I/O).

Money stays Decimal until it is drawn; formatting helpers turn it into text for people.
`tenant` None means every tenant; `period` is a UTC month, YYYY-MM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import polars as pl

REFUSALS = ("denied", "rate_limited", "budget_exceeded", "unauthenticated", "bad_request")
ZERO = Decimal(0)


# --- formatting ------------------------------------------------------------------------------------
MISSING = "—"  # an unknown or absent value, in cards and in table cells alike
CENT = Decimal("0.01")


def money(value: Decimal | float | str | None) -> str:
    """The one money format of every page. From a cent up: dollars and cents with thousands separators
    (half-up); under a cent: four significant digits, at least four decimals, so a small amount never
    reads as free; zero: `$0.00`; unknown: `—`.

    >>> money(Decimal("1234.565")), money(Decimal("0.0002")), money(Decimal("0.00012345")), money(None)
    ('$1,234.57', '$0.0002', '$0.0001235', '—')
    """
    if value is None:
        return MISSING
    amount = value if isinstance(value, Decimal) else Decimal(str(value))
    if amount and abs(amount) < CENT:
        small = amount.quantize(Decimal(1).scaleb(amount.adjusted() - 3), rounding=ROUND_HALF_UP)
        if abs(small) < CENT:  # else it rounded up to a cent: shown in cents below
            digits = format(abs(small), "f").rstrip("0")
            places = max(4, len(digits.split(".")[1]))
            return f"{'-' if small < 0 else ''}${abs(small):.{places}f}"
    rounded = amount.quantize(CENT, rounding=ROUND_HALF_UP)
    return f"{'-' if rounded < 0 else ''}${abs(rounded):,.2f}"


def money_axis_format(largest: float | None) -> str:
    """The d3 format of a money axis whose largest value is `largest`: dollars and cents, or below
    that as many decimals as ticks need to stay distinct (ticks are at least a twentieth of the
    range apart, at 1, 2 or 5 times a power of ten). One format for every tick of an axis: a
    per-tick rule would print 0.015 and 0.02 both as `$0.02`.

    >>> money_axis_format(1234.5), money_axis_format(0.05), money_axis_format(0.0002), money_axis_format(0)
    ('$,.2f', '$,.3f', '$,.5f', '$,.2f')
    """
    if not largest or largest <= 0:
        return "$,.2f"
    return f"$,.{max(2, math.ceil(round(-math.log10(largest / 20), 9)))}f"


def count(value: int | None) -> str:
    """`12,345`; None → `—`."""
    return MISSING if value is None else f"{value:,}"


def percent(value: float | None, places: int = 1) -> str:
    return MISSING if value is None else f"{value:.{places}f}%"


def duration(seconds: float) -> str:
    """A rough age for people: `45 s`, `12 min`, `3 h`, `2 days`."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size * (2 if unit == "days" else 1):
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


#: The header of every column any table shows: one mapping, so no page shows a snake_case name.
LABELS = {
    "adjustments_usd": "Adjustments (USD)", "amount_due_usd": "Amount due (USD)", "amount_usd": "Amount (USD)",
    "applies_to": "Applies to", "billing_mode": "Billing mode", "byok_cost_usd": "BYOK cost (USD)",
    "byok_fee_usd": "BYOK fee (USD)", "byok_usd": "BYOK (USD)", "charges_usd": "Charges (USD)", "closed": "Closed",
    "cost_usd": "Cost (USD)", "count": "Refused requests", "created_at": "Added at (UTC)",
    "credits_added_usd": "Credits added (USD)", "credits_applied_usd": "Credits applied (USD)",
    "credits_closing_usd": "Credits at closing (USD)", "credits_opening_usd": "Credits at opening (USD)",
    "effect": "Effect", "errors": "Errors", "forecast_usd": "Forecast (USD)", "input_tokens": "Input tokens",
    "key_health": "Key health", "keys": "Keys (in failover order)", "last_seen": "Last seen", "limit": "Limit",
    "limit_usd": "Limit (USD)", "line": "Line", "markup_usd": "Markup (USD)", "metric": "Metric", "model": "Model",
    "models": "Models", "note": "Note", "outcome": "Outcome", "output_tokens": "Output tokens",
    "over_forecast": "Forecast over limit", "percent": "Used", "period": "Period", "provider": "Provider",
    "refusals": "Refusals", "requests": "Requests", "role": "Role", "spent_usd": "Spent (USD)", "subject": "Subject",
    "tenant": "Tenant", "tenants": "Tenants", "total_usd": "Total (USD)", "unified_cost_usd": "Unified cost (USD)",
    "unified_usd": "Unified billing (USD)", "unpriced_requests": "Unpriced requests", "user": "User",
    "user_pseudonym": "User (pseudonym)", "window": "Window",
}


def label(column: str) -> str:
    """A column's header for people (`cost_usd` → `Cost (USD)`); a column missing from `LABELS` still
    gets words, never its snake_case name."""
    if column in LABELS:
        return LABELS[column]
    usd = column.endswith("_usd")
    words = (column[:-4] if usd else column).replace("_", " ").capitalize()
    return f"{words} (USD)" if usd else words


def is_money(column: str) -> bool:
    return column.endswith("_usd")


def for_display(frame: pl.DataFrame) -> pl.DataFrame:
    """A table as people read it: money (`*_usd` columns) as text by `money`, missing text as `—`,
    headers by `label`. Other numbers stay numbers, for the table widget to format and sort (it
    draws their missing cells as `—` too). The report files and downloads keep the exact values."""
    return (frame.with_columns(*(money_text(frame[c]) for c in frame.columns if is_money(c)))
            .with_columns(pl.col(pl.String).fill_null(MISSING))
            .rename(label))


def money_text(amounts: pl.Series, name: str | None = None) -> pl.Series:
    """The amounts as text by `money` (Decimals, floats or numeric strings; null → `—`)."""
    return pl.Series(name or amounts.name, [money(v) for v in amounts.to_list()], dtype=pl.String)


def with_money_text(frame: pl.DataFrame, column: str, text: str) -> pl.DataFrame:
    """`frame` with a `text` column: the amounts of `column` as people read them (chart tooltips)."""
    return frame.with_columns(money_text(frame[column], text))


# --- filters ---------------------------------------------------------------------------------------
def month_of(day_column: str = "day") -> pl.Expr:
    return pl.col(day_column).dt.strftime("%Y-%m")


def periods(*frames: pl.DataFrame | None) -> list[str]:
    """Every month any of the frames covers, newest first (`day`, `month` or `period` columns)."""
    found: set[str] = set()
    for frame in frames:
        if frame is None or frame.is_empty():
            continue
        if "day" in frame.columns:
            found.update(frame.select(month_of()).to_series().drop_nulls().to_list())
        for column in ("month", "period"):
            if column in frame.columns:
                found.update(frame[column].drop_nulls().to_list())
    return sorted(found, reverse=True)


def tenants(*frames: pl.DataFrame | None, known: tuple[str, ...] = ()) -> list[str]:
    """Every tenant named in the frames or in tenants.csv, sorted."""
    found = set(known)
    for frame in frames:
        if frame is not None and "tenant" in frame.columns:
            found.update(frame["tenant"].drop_nulls().to_list())
    return sorted(found)


def scoped(frame: pl.DataFrame, period: str | None, tenant: str | None) -> pl.DataFrame:
    """Rows of one month (by `day`, `month` or `period`) and one tenant; None keeps all."""
    if period is not None:
        if "day" in frame.columns:
            frame = frame.filter(month_of() == period)
        elif "month" in frame.columns:
            frame = frame.filter(pl.col("month") == period)
        elif "period" in frame.columns:
            frame = frame.filter(pl.col("period") == period)
    if tenant is not None:
        frame = frame.filter(pl.col("tenant") == tenant)
    return frame


def previous_period(period: str) -> str:
    year, month = map(int, period.split("-"))
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


# --- overview --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Overview:
    spend: Decimal | None
    spend_today: Decimal | None
    requests: int
    errors: int  # admitted, then failed: provider errors, timeouts, internal errors, cancellations
    refusals: int  # refused by the gateway itself (`REFUSALS`), never counted as errors
    unpriced_requests: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    previous_spend: Decimal | None  # the previous month over the same days
    compared_days: int | None  # how many days of each month were compared (None: whole months)
    history_start: date | None  # the first day of traffic in the reports (None: none at all)
    previous_covered: bool  # the history reaches back to the first day of the previous month

    @property
    def error_rate(self) -> float | None:
        return 100 * self.errors / self.requests if self.requests else None

    @property
    def refusal_rate(self) -> float | None:
        return 100 * self.refusals / self.requests if self.requests else None

    @property
    def trend(self) -> float | None:
        """Percent change of spend against the previous month over the same days; None when that month
        is only partly covered by the history (against a partial month any change looks huge)."""
        if self.spend is None or not self.previous_spend or not self.previous_covered:
            return None
        return float((self.spend - self.previous_spend) * 100 / self.previous_spend)


def cost_or_zero(column: str = "cost_usd") -> pl.Expr:
    """A row's cost; zero when it has none but no unpriced request either: nothing was used (refused
    or failed calls), so nothing is owed. Unpriced usage stays unknown (null)."""
    return pl.coalesce(pl.col(column), pl.when(pl.col("unpriced_requests") == 0).then(pl.lit(0)))


def known_sum(frame: pl.DataFrame, column: str = "cost_usd") -> Decimal | None:
    """The exact sum of the known amounts: zero for no rows, None when rows exist but none has a
    known amount (all unpriced: never a made-up zero). Rows that count unpriced requests say which
    missing amounts are unknown (`cost_or_zero`)."""
    if "unpriced_requests" in frame.columns:
        frame = frame.with_columns(cost_or_zero(column).alias(column))
    values = frame[column].drop_nulls()
    if values.is_empty():
        return None if frame.height else ZERO
    return sum(values.to_list(), ZERO)


def attributed(refused: pl.DataFrame) -> pl.DataFrame:
    """The refusals that `tenant_costs` also counts as requests: those with a tenant and a model."""
    return refused.filter(pl.col("tenant").is_not_null() & pl.col("model").is_not_null())


def overview(costs: pl.DataFrame, refused: pl.DataFrame, period: str, tenant: str | None, today: date) -> Overview:
    """The headline figures of a month. In the current month the trend compares the days so far
    with the same days of the previous month; for a past month it compares whole months.
    `tenant_costs` counts every request that was not `ok` in `errors`: refusals are taken out."""
    rows = scoped(costs, period, tenant)
    requests = int(rows["requests"].sum())
    refusals = int(scoped(attributed(refused), period, tenant)["count"].sum())
    compared = today.day if today.strftime("%Y-%m") == period else None
    before = scoped(costs, previous_period(period), tenant)
    start = costs["day"].min()  # the whole deployment's history, whatever the tenant filter
    if compared is not None:
        before = before.filter(pl.col("day").dt.day() <= compared)
    return Overview(
        spend=known_sum(rows),
        spend_today=known_sum(rows.filter(pl.col("day") == today)),
        requests=requests,
        errors=max(int(rows["errors"].sum()) - refusals, 0),
        refusals=refusals,
        unpriced_requests=int(rows["unpriced_requests"].sum()),
        p50_latency_ms=_weighted(rows, "p50_latency_ms"),
        p95_latency_ms=_weighted(rows, "p95_latency_ms"),
        previous_spend=known_sum(before),
        compared_days=compared,
        history_start=start,
        previous_covered=start is not None and start <= date.fromisoformat(f"{previous_period(period)}-01"),
    )


def _weighted(rows: pl.DataFrame, column: str) -> float | None:
    """The request-weighted mean of a per-group latency percentile (groups with a value only)."""
    known = rows.filter(pl.col(column).is_not_null())
    weight = known["requests"].sum()
    if not weight:
        return None
    return float((known[column].cast(pl.Float64) * known["requests"]).sum() / weight)


def unpriced_models(costs: pl.DataFrame, period: str, tenant: str | None) -> pl.DataFrame:
    """The models used without a price in a month (`provider/model`, as in the report): their unpriced
    requests, the tenants that sent them (joined, sorted) and the last day seen; most requests first."""
    return (scoped(costs, period, tenant).filter(pl.col("unpriced_requests") > 0)
            .group_by("model")
            .agg(unpriced_requests=pl.col("unpriced_requests").sum(),
                 tenants=pl.col("tenant").drop_nulls().unique().sort().str.join(", "),
                 last_seen=pl.col("day").max())
            .sort("unpriced_requests", "model", descending=[True, False]))


# --- spend over time -------------------------------------------------------------------------------
def spent_rows(costs: pl.DataFrame) -> pl.DataFrame:
    """The rows that belong in a spend chart: a known cost above zero, or at least one request that
    succeeded. Refused models (a denied or misspelt name) and calls that only failed stay out of the
    legends; they are counted in the tables and on the Policy page."""
    return costs.filter((pl.col("cost_usd") > 0).fill_null(False) | (pl.col("requests") > pl.col("errors")))


def spend_by(costs: pl.DataFrame, dimension: str) -> pl.DataFrame:
    """Daily spend per value of `dimension` (model, provider, billing_mode, tenant) over `spent_rows`,
    with requests; `cost_usd` as a float for charts only, and `spend` as people read it."""
    daily = (spent_rows(costs).group_by("day", dimension)
             .agg(cost=known_cost(), requests=pl.col("requests").sum())
             .with_columns(pl.col(dimension).fill_null("unknown"))
             .sort("day", dimension))
    return (with_money_text(daily, "cost", "spend")
            .with_columns(cost_usd=pl.col("cost").cast(pl.Float64)).drop("cost")
            .select("day", dimension, "requests", "cost_usd", "spend"))


def days_between(frame: pl.DataFrame, column: str = "day") -> list[date]:
    """Every day from the frame's first to its last (the x axis of a daily chart, gaps included)."""
    if frame.is_empty():
        return []
    return pl.date_range(frame[column].min(), frame[column].max(), eager=True).to_list()


def known_cost(column: str = "cost_usd") -> pl.Expr:
    """Sum of the known costs (`cost_or_zero`); null when none is known (all unpriced), never a
    made-up zero."""
    cost = cost_or_zero(column)
    return pl.when(cost.count() > 0).then(cost.sum())


def spend_table(costs: pl.DataFrame, refused: pl.DataFrame, dimension: str) -> pl.DataFrame:
    """Spend, requests, errors, refusals and tokens per value of `dimension` (tenant or model) over the
    rows, largest spend first; errors and refusals counted as in the headline (`overview`)."""
    refusals = attributed(refused).group_by(dimension).agg(refusals=pl.col("count").sum())
    return (costs.group_by(dimension)
            .agg(requests=pl.col("requests").sum(), failed=pl.col("errors").sum(),
                 input_tokens=pl.col("input_tokens").sum(), output_tokens=pl.col("output_tokens").sum(),
                 cost_usd=known_cost(), unpriced_requests=pl.col("unpriced_requests").sum())
            .join(refusals, on=dimension, how="left")
            .with_columns(pl.col("refusals").fill_null(0))
            .with_columns(errors=(pl.col("failed") - pl.col("refusals")).clip(lower_bound=0))
            .select(dimension, "requests", "errors", "refusals", "input_tokens", "output_tokens", "cost_usd",
                    "unpriced_requests")
            .sort("cost_usd", dimension, descending=[True, False], nulls_last=True))


# --- budgets ---------------------------------------------------------------------------------------
def budget_burn(status: pl.DataFrame | None, tenant: str | None) -> pl.DataFrame:
    """Each budget of the tenant (all tenants when None): spent, limit, percent, forecast and
    whether the forecast runs past the limit."""
    if status is None or status.is_empty():
        return pl.DataFrame(schema={"tenant": pl.String, "window": pl.String, "subject": pl.String,
                                    "user_pseudonym": pl.String, "spent_usd": pl.Decimal(38, 9),
                                    "limit_usd": pl.Decimal(38, 9), "percent": pl.Float64,
                                    "forecast_usd": pl.Decimal(38, 9), "over_forecast": pl.Boolean})
    rows = status if tenant is None else status.filter(pl.col("tenant") == tenant)
    return (rows.select("tenant", "window", "subject", "user_pseudonym", "spent_usd", "limit_usd", "percent",
                        "forecast_usd")
            .with_columns(over_forecast=pl.col("forecast_usd") > pl.col("limit_usd"))
            .sort("percent", descending=True, nulls_last=True))


def cumulative_spend(costs: pl.DataFrame, period: str, tenant: str | None) -> pl.DataFrame:
    """Running spend through a month, day by day: `spent_usd` as a float for the burn chart, `spent`
    as people read it."""
    daily = (scoped(costs, period, tenant).group_by("day").agg(cost=pl.col("cost_usd").sum()).sort("day")
             .with_columns(pl.col("cost").fill_null(0).cum_sum()))
    return (with_money_text(daily, "cost", "spent")
            .with_columns(spent_usd=pl.col("cost").cast(pl.Float64)).select("day", "spent_usd", "spent"))


# --- users, billing, policy ------------------------------------------------------------------------
def top_spenders(users: pl.DataFrame, period: str, tenant: str | None, limit: int = 20) -> pl.DataFrame:
    """The pseudonymous users with the largest spend in a month."""
    return (scoped(users, period, tenant)
            .select("tenant", "user_pseudonym", "requests", "input_tokens", "output_tokens",
                    cost_or_zero().alias("cost_usd"), "unpriced_requests")
            .sort("cost_usd", "requests", descending=True, nulls_last=True)
            .head(limit))


def spender_bars(top: pl.DataFrame) -> pl.DataFrame:
    """One bar per top spender: `user` (tenant and the pseudonym's first 8 characters), `cost_usd` as a
    float for the chart, `spend` as people read it."""
    return (with_money_text(top, "cost_usd", "spend")
            .select(user=pl.col("tenant") + " · " + pl.col("user_pseudonym").str.slice(0, 8),
                    cost_usd=pl.col("cost_usd").cast(pl.Float64), spend=pl.col("spend")))


def credit_balances(statements: pl.DataFrame, tenant: str | None) -> pl.DataFrame:
    """Each tenant's credits at the close of its latest statement."""
    rows = statements if tenant is None else statements.filter(pl.col("tenant") == tenant)
    return (rows.sort("period").group_by("tenant", maintain_order=True).last()
            .select("tenant", "period", "credits_closing_usd", "amount_due_usd").sort("tenant"))


def denials_over_time(refused: pl.DataFrame, period: str, tenant: str | None) -> pl.DataFrame:
    """Refusals per day and outcome in a month (unattributed ones under tenant `none`)."""
    return (scoped(refused.with_columns(pl.col("tenant").fill_null("none")), period, tenant)
            .group_by("day", "outcome").agg(count=pl.col("count").sum()).sort("day", "outcome"))


def denials_by_model(refused: pl.DataFrame, period: str, tenant: str | None) -> pl.DataFrame:
    return (scoped(refused.with_columns(pl.col("tenant").fill_null("none")), period, tenant)
            .group_by("tenant", "model", "outcome").agg(count=pl.col("count").sum())
            .sort("count", "tenant", "model", descending=[True, False, False], nulls_last=True))
