"""Report math: pure `LazyFrame -> LazyFrame` functions over the events (no I/O here).

Money stays Decimal end to end (DuckDB DECIMAL(18,9) → Polars Decimal); an unpriced request has a
null cost and is counted apart, never summed as zero. Every output is sorted on its keys, so the
same events give the same bytes whatever order they were written in.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

import polars as pl

from proxy.limiter import ADMITTED
from proxy.limits import window_end, window_start

#: Outcomes that are refusals by the gateway itself (they never reached a provider).
REFUSALS = ("denied", "rate_limited", "budget_exceeded", "unauthenticated", "bad_request")
#: Exact sum of the known costs; null when there is none (all unpriced or no usage), never a made-up 0.
KNOWN_COST = pl.when(pl.col("cost_usd").count() > 0).then(pl.col("cost_usd").sum())
#: Requests with usage but no price: "unpriced usage", reported apart.
UNPRICED = (pl.col("cost_usd").is_null() & (pl.col("usage_source") != "none")).sum().cast(pl.Int64)


def with_periods(events: pl.LazyFrame) -> pl.LazyFrame:
    """Add `day` (date, UTC) and `month` (YYYY-MM) from `ts`."""
    utc = pl.col("ts").dt.convert_time_zone("UTC")
    return events.with_columns(day=utc.dt.date(), month=utc.dt.strftime("%Y-%m"))


def tenant_costs(events: pl.LazyFrame) -> pl.LazyFrame:
    """Per day, tenant, provider, model and billing mode: volume, tokens, cost and latency."""
    keys = ["day", "tenant", "provider", "model", "billing_mode"]
    return (events.pipe(with_periods)
            .filter(pl.col("tenant").is_not_null() & pl.col("model").is_not_null())
            .group_by(keys)
            .agg(requests=pl.len().cast(pl.Int64),
                 errors=(pl.col("outcome") != "ok").sum().cast(pl.Int64),
                 input_tokens=pl.col("input_tokens").sum(),
                 output_tokens=pl.col("output_tokens").sum(),
                 cached_input_tokens=pl.col("cached_input_tokens").sum(),
                 cost_usd=KNOWN_COST,
                 unpriced_requests=UNPRICED,
                 p50_latency_ms=pl.col("latency_ms").quantile(0.50, "nearest"),
                 p95_latency_ms=pl.col("latency_ms").quantile(0.95, "nearest"))
            .sort(keys, nulls_last=True))


def user_costs(events: pl.LazyFrame) -> pl.LazyFrame:
    """Per month, tenant and pseudonymous user: requests, tokens and cost."""
    keys = ["month", "tenant", "user_pseudonym"]
    return (events.pipe(with_periods)
            .filter(pl.col("user_pseudonym").is_not_null())
            .with_columns(pl.col("user_pseudonym").cast(pl.String))
            .group_by(keys)
            .agg(requests=pl.len().cast(pl.Int64),
                 input_tokens=pl.col("input_tokens").sum(),
                 output_tokens=pl.col("output_tokens").sum(),
                 cost_usd=KNOWN_COST,
                 unpriced_requests=UNPRICED)
            .sort(keys))


def denials(events: pl.LazyFrame) -> pl.LazyFrame:
    """Per day, tenant, outcome and model: how many requests the gateway refused."""
    keys = ["day", "tenant", "outcome", "model"]
    return (events.pipe(with_periods)
            .filter(pl.col("outcome").is_in(REFUSALS))
            .group_by(keys)
            .agg(count=pl.len().cast(pl.Int64))
            .sort(keys, nulls_last=True))


def period_usage(events: pl.LazyFrame) -> pl.LazyFrame:
    """Per month and tenant: the known cost of unified and of BYOK usage, and unpriced requests.

    The input of the billing statements (`analytics.billing`)."""
    keys = ["month", "tenant"]

    def cost_of(mode: str) -> pl.Expr:
        return pl.col("cost_usd").filter(pl.col("billing_mode") == mode).sum()

    return (events.pipe(with_periods)
            .filter(pl.col("tenant").is_not_null() & pl.col("billing_mode").is_not_null())
            .group_by(keys)
            .agg(unified_cost_usd=cost_of("unified"), byok_cost_usd=cost_of("byok"), unpriced_requests=UNPRICED)
            .sort(keys))


def budget_status(events: pl.LazyFrame, limits: list, now: datetime) -> pl.DataFrame:
    """Per `usd` limit (tenant-wide, and each user for `*` limits): spent in the current window, the
    limit, percent used, and a forecast for the window's end at the run rate so far.

    Role and named-user budgets are enforced by the gateway but not listed here: events carry
    pseudonyms and no roles, so their members cannot be told apart in a report.
    """
    rows = []
    admitted = (events.with_columns(pl.col("ts").dt.convert_time_zone("UTC"))
                .filter(pl.col("outcome").is_in(ADMITTED) & pl.col("tenant").is_not_null()))
    for rule in (r for r in limits if r.metric == "usd" and r.subject in ("tenant", "*")):
        start, end = window_start(rule.window, now), window_end(rule.window, window_start(rule.window, now))
        scoped = admitted.filter((pl.col("ts") >= start) & (pl.col("ts") < end))
        if rule.tenant != "*":
            scoped = scoped.filter(pl.col("tenant") == rule.tenant)
        keys = ["tenant"] if rule.subject == "tenant" else ["tenant", "user_pseudonym"]
        spent = (scoped.with_columns(pl.col("user_pseudonym").cast(pl.String))
                 .group_by(keys).agg(spent=pl.col("cost_usd").sum()).collect())
        if rule.tenant != "*" and spent.is_empty() and rule.subject == "tenant":
            spent = pl.DataFrame({"tenant": [rule.tenant], "spent": [Decimal(0)]})
        elapsed = max((now - start).total_seconds(), 1.0)
        share = Decimal(str((end - start).total_seconds())) / Decimal(str(elapsed))
        for row in spent.iter_rows(named=True):
            used = row["spent"] or Decimal(0)
            rows.append({"line": rule.line, "tenant": row["tenant"], "subject": rule.subject,
                         "user_pseudonym": row.get("user_pseudonym"), "window": rule.window,
                         "window_start": start, "limit_usd": rule.limit, "spent_usd": used,
                         "percent": float(used * 100 / rule.limit) if rule.limit else None,
                         "forecast_usd": (used * share).quantize(Decimal("0.000000001"))})
    schema = {"line": pl.Int64, "tenant": pl.String, "subject": pl.String, "user_pseudonym": pl.String,
              "window": pl.String, "window_start": pl.Datetime("us", "UTC"), "limit_usd": pl.Decimal(38, 9),
              "spent_usd": pl.Decimal(38, 9), "percent": pl.Float64, "forecast_usd": pl.Decimal(38, 9)}
    frame = pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)
    return frame.sort(["tenant", "line", "user_pseudonym"], nulls_last=True)
