"""The dashboard's numbers: pure functions over report frames (no Streamlit, no I/O).

Money stays Decimal until it is drawn; formatting helpers turn it into text for people.
`tenant` None means every tenant; `period` is a UTC month, YYYY-MM.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal

import polars as pl

REFUSALS = ("denied", "rate_limited", "budget_exceeded", "unauthenticated", "bad_request")
ZERO = Decimal(0)


# --- formatting ------------------------------------------------------------------------------------
def money(value: Decimal | None, places: int = 2) -> str:
    """`$1,234.57`; amounts under a cent keep four places so they do not read as free (below a
    hundredth of a cent: `<$0.0001`); None → `–`.

    >>> money(Decimal("1234.565")), money(Decimal("0.0042")), money(Decimal("0.00004")), money(None)
    ('$1,234.57', '$0.0042', '<$0.0001', '–')
    """
    if value is None:
        return "–"
    if value and abs(value) < Decimal("0.0001"):
        return f"{'-' if value < 0 else ''}<$0.0001"
    if value and abs(value) < Decimal("0.01"):
        places = 4
    quantum = Decimal(1).scaleb(-places)
    rounded = Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP)
    sign = "-" if rounded < 0 else ""
    return f"{sign}${abs(rounded):,.{places}f}"


def count(value: int | None) -> str:
    """`12,345`; None → `–`."""
    return "–" if value is None else f"{value:,}"


def percent(value: float | None, places: int = 1) -> str:
    return "–" if value is None else f"{value:.{places}f}%"


def duration(seconds: float) -> str:
    """A rough age for people: `45 s`, `12 min`, `3 h`, `2 days`."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size * (2 if unit == "days" else 1):
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


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
    errors: int  # provider errors, timeouts and cancellations (refusals counted apart)
    refusals: int
    unpriced_requests: int
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    previous_spend: Decimal | None  # the previous month over the same days
    compared_days: int | None  # how many days of each month were compared (None: whole months)

    @property
    def error_rate(self) -> float | None:
        return 100 * self.errors / self.requests if self.requests else None

    @property
    def refusal_rate(self) -> float | None:
        return 100 * self.refusals / self.requests if self.requests else None

    @property
    def trend(self) -> float | None:
        """Percent change of spend against the previous month over the same days."""
        if self.spend is None or not self.previous_spend:
            return None
        return float((self.spend - self.previous_spend) * 100 / self.previous_spend)


def known_sum(frame: pl.DataFrame, column: str = "cost_usd") -> Decimal | None:
    """The exact sum of the known amounts: zero for no rows, None when rows exist but none has a
    known amount (all unpriced: never a made-up zero)."""
    values = frame[column].drop_nulls()
    if values.is_empty():
        return None if frame.height else ZERO
    return sum(values.to_list(), ZERO)


def overview(costs: pl.DataFrame, refused: pl.DataFrame, period: str, tenant: str | None, today: date) -> Overview:
    """The headline figures of a month. In the current month the trend compares the days so far
    with the same days of the previous month; for a past month it compares whole months."""
    rows = scoped(costs, period, tenant)
    requests = int(rows["requests"].sum())
    refusals = int(scoped(refused, period, tenant).filter(pl.col("model").is_not_null())["count"].sum())
    compared = today.day if today.strftime("%Y-%m") == period else None
    before = scoped(costs, previous_period(period), tenant)
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
def spend_by(costs: pl.DataFrame, dimension: str) -> pl.DataFrame:
    """Daily spend per value of `dimension` (model, provider, billing_mode, tenant), with requests;
    `cost_usd` as a float for charts only."""
    return (costs.group_by("day", dimension)
            .agg(cost=pl.col("cost_usd").sum(), requests=pl.col("requests").sum())
            .with_columns(pl.col(dimension).fill_null("unknown"),
                          cost_usd=pl.col("cost").cast(pl.Float64))
            .drop("cost")
            .sort("day", dimension))


def known_cost(column: str = "cost_usd") -> pl.Expr:
    """Sum of the known costs; null when none is known (all unpriced), never a made-up zero."""
    return pl.when(pl.col(column).count() > 0).then(pl.col(column).sum())


def spend_table(costs: pl.DataFrame, dimension: str) -> pl.DataFrame:
    """Spend, requests and tokens per value of `dimension` over the rows, largest spend first."""
    return (costs.group_by(dimension)
            .agg(requests=pl.col("requests").sum(), errors=pl.col("errors").sum(),
                 input_tokens=pl.col("input_tokens").sum(), output_tokens=pl.col("output_tokens").sum(),
                 cost_usd=known_cost(), unpriced_requests=pl.col("unpriced_requests").sum())
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
    """Running spend through a month, day by day (floats, for the burn chart)."""
    daily = (scoped(costs, period, tenant).group_by("day").agg(cost=pl.col("cost_usd").sum()).sort("day"))
    return daily.with_columns(spent_usd=pl.col("cost").cast(pl.Float64).fill_null(0).cum_sum()).drop("cost")


# --- users, billing, policy ------------------------------------------------------------------------
def top_spenders(users: pl.DataFrame, period: str, tenant: str | None, limit: int = 20) -> pl.DataFrame:
    """The pseudonymous users with the largest spend in a month."""
    return (scoped(users, period, tenant)
            .select("tenant", "user_pseudonym", "requests", "input_tokens", "output_tokens", "cost_usd",
                    "unpriced_requests")
            .sort("cost_usd", "requests", descending=True, nulls_last=True)
            .head(limit))


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
