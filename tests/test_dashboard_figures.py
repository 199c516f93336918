"""The dashboard's pure figures (`dashboard.figures`) and its read-only loads (`dashboard.data`), on small
hand-built Polars frames with exact Decimal money, and on tiny deployments made by `tollway init`."""

from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from dashboard import figures
from dashboard.data import (
    REPORT_NAMES,
    KeyInfo,
    Reports,
    control_fingerprint,
    policy_fingerprint,
    read_control,
    read_manifest,
    read_policy,
    read_reports,
    report_interval_s,
    staleness,
)
from proxy.cli import main as cli_main
from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key

MONEY = pl.Decimal(38, 9)
D = Decimal
COSTS_SCHEMA = {
    "day": pl.Date, "tenant": pl.String, "provider": pl.String, "model": pl.String, "billing_mode": pl.String,
    "requests": pl.Int64, "errors": pl.Int64, "input_tokens": pl.Int64, "output_tokens": pl.Int64,
    "cached_input_tokens": pl.Int64, "cost_usd": MONEY, "unpriced_requests": pl.Int64,
    "p50_latency_ms": pl.Float64, "p95_latency_ms": pl.Float64,
}
DENIALS_SCHEMA = {"day": pl.Date, "tenant": pl.String, "outcome": pl.String, "model": pl.String, "count": pl.Int64}
USERS_SCHEMA = {"month": pl.String, "tenant": pl.String, "user_pseudonym": pl.String, "requests": pl.Int64,
                "input_tokens": pl.Int64, "output_tokens": pl.Int64, "cost_usd": MONEY,
                "unpriced_requests": pl.Int64}
STATEMENT_MONEY = pl.Decimal(18, 2)
BUDGET_SCHEMA = {"line": pl.Int64, "tenant": pl.String, "subject": pl.String, "user_pseudonym": pl.String,
                 "window": pl.String, "window_start": pl.Datetime("us", "UTC"), "limit_usd": pl.Decimal(18, 9),
                 "spent_usd": MONEY, "percent": pl.Float64, "forecast_usd": MONEY}


def costs(*rows: tuple) -> pl.DataFrame:
    """tenant_costs rows: (day, tenant, provider, model, mode, requests, errors, cost, unpriced, p50, p95)."""
    return pl.DataFrame([(day, tenant, provider, model, mode, requests, errors, 100 * requests, 10 * requests, 0,
                          None if cost is None else D(cost), unpriced, p50, p95)
                         for day, tenant, provider, model, mode, requests, errors, cost, unpriced, p50, p95 in rows],
                        schema=COSTS_SCHEMA, orient="row")


def refused(*rows: tuple) -> pl.DataFrame:
    return pl.DataFrame(list(rows), schema=DENIALS_SCHEMA, orient="row")


# --- formatting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "text"), [
    (D("1234.565"), "$1,234.57"),  # half-up, not banker's rounding
    (D("0.125"), "$0.13"),
    (D("1234567.891"), "$1,234,567.89"),
    (D("-1234.565"), "-$1,234.57"),
    (D("0"), "$0.00"),
    (D("-0.000"), "$0.00"),
    (D("0.0042"), "$0.0042"),  # under a cent: four significant digits, so it does not read as free
    (D("-0.0042"), "-$0.0042"),
    (D("0.0002"), "$0.0002"),
    (D("0.000200000"), "$0.0002"),  # as a Decimal(38, 9) report column holds it
    (D("0.0001234"), "$0.0001234"),
    (D("0.00012345"), "$0.0001235"),  # four significant digits, half-up
    (D("0.00421"), "$0.00421"),
    (D("0.005"), "$0.0050"),  # at least four decimals
    (D("0.00004"), "$0.00004"),
    (D("0.000000123"), "$0.000000123"),
    (D("0.0099996"), "$0.01"),  # rounds up to a cent: shown in cents
    (D("0.01"), "$0.01"),
    (0.0002, "$0.0002"),  # a float (chart data) reads the same
    ("50", "$50.00"),  # as control.db stores credits
    (None, "—"),
])
def test_money(value, text):
    assert figures.money(value) == text


@pytest.mark.parametrize(("largest", "fmt"), [
    (1234.5, "$,.2f"), (12.0, "$,.2f"), (0.5, "$,.2f"), (0.2, "$,.2f"),  # ticks a cent or more apart
    (0.05, "$,.3f"),  # ticks 0.005 apart
    (0.0002, "$,.5f"),  # ticks 0.00002 apart
    (0.0, "$,.2f"), (None, "$,.2f"),  # no data: an axis of zeros
])
def test_money_axis_format_by_magnitude(largest, fmt):
    assert figures.money_axis_format(largest) == fmt


@pytest.mark.parametrize(("column", "header"), [
    ("cost_usd", "Cost (USD)"), ("credits_opening_usd", "Credits at opening (USD)"),
    ("user_pseudonym", "User (pseudonym)"), ("input_tokens", "Input tokens"), ("count", "Refused requests"),
    ("keys", "Keys (in failover order)"),
    ("some_new_usd", "Some new (USD)"), ("brand_new_column", "Brand new column"),  # not in LABELS: still words
])
def test_label(column, header):
    assert figures.label(column) == header


def test_for_display_formats_money_fills_missing_text_and_labels_headers():
    frame = pl.DataFrame({
        "tenant": ["acme", "globex", "initech"],
        "user_pseudonym": ["u-1", None, "u-3"],
        "requests": [1234, 2, None],
        "cost_usd": pl.Series([D("1234.565"), D("0.0002"), None], dtype=MONEY),
        "limit_usd": [5000.0, 0.0, None],
        "closed": [True, False, None],
    })
    assert_frame_equal(figures.for_display(frame), pl.DataFrame({
        "Tenant": ["acme", "globex", "initech"],
        "User (pseudonym)": ["u-1", "—", "u-3"],
        "Requests": [1234, 2, None],  # numbers stay numbers: the table widget draws None as —
        "Cost (USD)": ["$1,234.57", "$0.0002", "—"],
        "Limit (USD)": ["$5,000.00", "$0.00", "—"],
        "Closed": [True, False, None],
    }))
    assert figures.for_display(frame.clear()).columns == ["Tenant", "User (pseudonym)", "Requests", "Cost (USD)",
                                                          "Limit (USD)", "Closed"]


def test_count_percent_and_duration():
    assert figures.count(12345) == "12,345"
    assert figures.count(0) == "0"
    assert figures.count(None) == "—"
    assert figures.percent(12.345) == "12.3%"
    assert figures.percent(None) == "—"
    assert [figures.duration(s) for s in (45, 60, 12 * 60, 3600, 86400, 2 * 86400, 5 * 86400)] \
        == ["45 s", "1 min", "12 min", "1 h", "24 h", "2 days", "5 days"]


# --- filters -------------------------------------------------------------------------------------------
def test_periods_collects_every_month_newest_first():
    daily = costs((date(2026, 1, 31), "acme", "openai", "openai/m", "unified", 1, 0, "1", 0, 1.0, 1.0),
                  (date(2025, 12, 1), "acme", "openai", "openai/m", "unified", 1, 0, "1", 0, 1.0, 1.0))
    monthly = pl.DataFrame({"month": ["2026-02", None], "tenant": ["acme", "acme"]})
    statements = pl.DataFrame({"period": ["2025-11", "2026-01"], "tenant": ["acme", "globex"]})
    assert figures.periods(daily, None, monthly, statements, daily.clear()) == ["2026-02", "2026-01", "2025-12",
                                                                                 "2025-11"]
    assert figures.periods(None, daily.clear()) == []


def test_tenants_joins_frames_and_tenants_csv():
    frame = pl.DataFrame({"tenant": ["globex", None, "acme"]})
    assert figures.tenants(frame, None, pl.DataFrame({"x": [1]}), known=("zeta", "acme")) == ["acme", "globex", "zeta"]
    assert figures.tenants() == []


def test_scoped_by_day_month_period_and_tenant():
    daily = costs((date(2026, 1, 31), "acme", "openai", "openai/m", "unified", 1, 0, "1", 0, 1.0, 1.0),
                  (date(2026, 2, 1), "acme", "openai", "openai/m", "unified", 2, 0, "2", 0, 1.0, 1.0),
                  (date(2026, 2, 28), "globex", "openai", "openai/m", "unified", 3, 0, "3", 0, 1.0, 1.0))
    assert_frame_equal(figures.scoped(daily, "2026-02", None), daily[1:])
    assert_frame_equal(figures.scoped(daily, "2026-02", "globex"), daily[2:])
    assert_frame_equal(figures.scoped(daily, None, "acme"), daily[:2])
    assert_frame_equal(figures.scoped(daily, None, None), daily)
    assert figures.scoped(daily, "2026-03", None).is_empty()

    monthly = pl.DataFrame({"month": ["2026-01", "2026-02"], "tenant": ["acme", "acme"]})
    assert_frame_equal(figures.scoped(monthly, "2026-01", "acme"), monthly[:1])
    statements = pl.DataFrame({"period": ["2026-01", "2026-01"], "tenant": ["acme", "globex"]})
    assert_frame_equal(figures.scoped(statements, "2026-01", "globex"), statements[1:])


@pytest.mark.parametrize(("period", "before"), [("2026-01", "2025-12"), ("2026-11", "2026-10"),
                                                ("2026-10", "2026-09"), ("2000-03", "2000-02")])
def test_previous_period(period, before):
    assert figures.previous_period(period) == before


def test_known_sum_is_exact_and_never_a_made_up_zero():
    money = pl.DataFrame({"cost_usd": pl.Series([D("0.1"), D("0.2"), None], dtype=MONEY)})
    assert figures.known_sum(money) == D("0.3")  # exactly, not 0.30000000000000004
    assert figures.known_sum(money.clear()) == D(0)  # no rows: zero
    assert figures.known_sum(money[2:]) is None  # rows, but none priced: unknown
    assert figures.known_sum(pl.DataFrame({"x": pl.Series([D("1.5")], dtype=MONEY)}), "x") == D("1.5")


def test_known_sum_and_cost_of_refused_calls_is_zero_not_unknown():
    """A row without a cost is unknown only when it counts unpriced requests; refused or failed calls used
    nothing, so they cost nothing."""
    rows = pl.DataFrame({"tenant": ["acme", "acme", "globex"],
                         "cost_usd": pl.Series([None, None, None], dtype=MONEY), "unpriced_requests": [0, 0, 3]})
    assert figures.known_sum(rows[:2]) == D(0)  # refusals only: $0.00
    assert figures.known_sum(rows[2:]) is None  # unpriced usage and nothing known: unknown
    assert figures.known_sum(rows) == D(0)  # the known part (the unpriced requests are warned about apart)
    assert rows.group_by("tenant").agg(figures.known_cost()).sort("tenant")["cost_usd"].to_list() == [D(0), None]
    assert rows.select(figures.cost_or_zero())["cost_usd"].to_list() == [D(0), D(0), None]


# --- overview -------------------------------------------------------------------------------------------
OVERVIEW_COSTS = costs(
    (date(2026, 3, 1), "acme", "openai", "openai/gpt", "unified", 10, 2, "1.50", 0, 100.0, 200.0),
    (date(2026, 3, 10), "acme", "anthropic", "anthropic/claude", "byok", 5, 1, "0.25", 0, 400.0, 900.0),
    (date(2026, 3, 10), "globex", "openai", "openai/new", "unified", 4, 0, None, 4, None, None),  # all unpriced
    (date(2026, 2, 1), "acme", "openai", "openai/gpt", "unified", 3, 0, "2.00", 0, 50.0, 60.0),
    (date(2026, 2, 20), "acme", "openai", "openai/gpt", "unified", 3, 0, "7.00", 0, 50.0, 60.0),
)
OVERVIEW_DENIALS = refused(
    (date(2026, 3, 1), "acme", "denied", "openai/gpt", 1),
    (date(2026, 3, 10), "acme", "rate_limited", "anthropic/claude", 1),
    (date(2026, 3, 10), None, "unauthenticated", None, 3),  # no model: never in tenant_costs either
    (date(2026, 2, 5), "acme", "denied", "openai/gpt", 5),
)


def test_overview_of_the_current_month_compares_the_same_days():
    got = figures.overview(OVERVIEW_COSTS, OVERVIEW_DENIALS, "2026-03", None, date(2026, 3, 10))
    assert got == figures.Overview(
        spend=D("1.75"), spend_today=D("0.25"), requests=19, errors=1, refusals=2, unpriced_requests=4,
        p50_latency_ms=(100 * 10 + 400 * 5) / 15, p95_latency_ms=(200 * 10 + 900 * 5) / 15,
        previous_spend=D("2.00"), compared_days=10,  # Feb 20 is after day 10: left out
        history_start=date(2026, 2, 1), previous_covered=True)
    assert got.trend == pytest.approx(-12.5)
    assert got.error_rate == pytest.approx(100 / 19)
    assert got.refusal_rate == pytest.approx(200 / 19)
    assert isinstance(got.spend, Decimal)


def test_overview_of_a_past_month_compares_whole_months():
    got = figures.overview(OVERVIEW_COSTS, OVERVIEW_DENIALS, "2026-03", "acme", date(2026, 4, 2))
    assert got.compared_days is None
    assert got.previous_spend == D("9.00")
    assert got.spend == D("1.75") and got.requests == 15 and got.unpriced_requests == 0
    assert got.trend == pytest.approx((1.75 - 9) * 100 / 9)


def test_overview_of_an_all_unpriced_tenant_has_unknown_spend():
    got = figures.overview(OVERVIEW_COSTS, OVERVIEW_DENIALS, "2026-03", "globex", date(2026, 3, 10))
    assert got.spend is None and got.spend_today is None  # unknown, not $0
    assert got.requests == 4 and got.unpriced_requests == 4 and got.refusals == 0 and got.errors == 0
    assert got.p50_latency_ms is None and got.p95_latency_ms is None
    assert got.previous_spend == D(0) and got.trend is None
    assert got.error_rate == 0.0


def test_overview_of_an_empty_month():
    got = figures.overview(OVERVIEW_COSTS, OVERVIEW_DENIALS, "2025-06", None, date(2026, 3, 10))
    assert got.spend == D(0) and got.requests == 0
    assert got.error_rate is None and got.refusal_rate is None and got.trend is None
    assert got.p50_latency_ms is None


def test_overview_does_not_compare_against_a_partly_covered_month():
    """The demo's "+324 %": history from Feb 18, so Mar 1-10 against Feb 1-10 compared against 3 days."""
    rows = costs((date(2026, 2, 18), "acme", "openai", "openai/gpt", "unified", 3, 0, "0.50", 0, 1.0, 1.0),
                 (date(2026, 3, 2), "acme", "openai", "openai/gpt", "unified", 9, 0, "2.12", 0, 1.0, 1.0))
    current = figures.overview(rows, refused(), "2026-03", None, date(2026, 3, 10))
    assert current.history_start == date(2026, 2, 18) and not current.previous_covered
    assert current.previous_spend == D("0.00") and current.trend is None
    past = figures.overview(rows, refused(), "2026-03", None, date(2026, 4, 2))  # whole months: still partial
    assert past.previous_spend == D("0.50") and past.trend is None
    later = figures.overview(rows, refused(), "2026-04", None, date(2026, 4, 2))
    assert later.previous_covered and later.previous_spend == D("2.12") and later.trend == -100.0  # none in April


def test_overview_compares_a_month_covered_from_its_first_day():
    rows = costs((date(2026, 2, 1), "acme", "openai", "openai/gpt", "unified", 3, 0, "0.50", 0, 1.0, 1.0),
                 (date(2026, 2, 28), "acme", "openai", "openai/gpt", "unified", 3, 0, "9.00", 0, 1.0, 1.0),
                 (date(2026, 3, 2), "acme", "openai", "openai/gpt", "unified", 9, 0, "2.00", 0, 1.0, 1.0))
    got = figures.overview(rows, refused(), "2026-03", "acme", date(2026, 3, 31))  # Feb has 28 days: all of it
    assert got.previous_covered and got.compared_days == 31
    assert got.previous_spend == D("9.50") and got.trend == pytest.approx((2 - 9.5) * 100 / 9.5)
    assert figures.overview(rows, refused(), "2026-02", None, date(2026, 3, 31)).trend is None  # Jan: none


def test_overview_of_a_month_with_refusals_only_spent_nothing():
    rows = costs((date(2026, 3, 1), "acme", "anthropic", "anthropic/opus", None, 3, 3, None, 0, 1.0, 1.0))
    got = figures.overview(rows, refused((date(2026, 3, 1), "acme", "denied", "anthropic/opus", 3)), "2026-03",
                           None, date(2026, 3, 5))
    assert (got.spend, got.requests, got.errors, got.refusals) == (D(0), 3, 0, 3)


def test_overview_without_history():
    got = figures.overview(OVERVIEW_COSTS.clear(), OVERVIEW_DENIALS.clear(), "2026-03", None, date(2026, 3, 10))
    assert got.history_start is None and not got.previous_covered and got.trend is None


def test_overview_counts_refusals_apart_from_errors():
    """tenant_costs' `errors` counts every request that was not ok; the denials report says which of
    those were refusals. Unattributed refusals (no tenant or no model) are in neither report's rows."""
    rows = costs((date(2026, 3, 1), "acme", "openai", "openai/gpt", "unified", 10, 3, "1", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "openai", "openai/gpt", None, 4, 4, None, 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "openai", "openai/gtp-4o", None, 2, 2, None, 0, 1.0, 1.0))
    denied = refused((date(2026, 3, 1), "acme", "denied", "openai/gpt", 3),
                     (date(2026, 3, 1), "acme", "rate_limited", "openai/gpt", 1),
                     (date(2026, 3, 1), "acme", "denied", "openai/gtp-4o", 2),
                     (date(2026, 3, 1), None, "unauthenticated", "openai/gpt", 7),
                     (date(2026, 3, 1), "acme", "bad_request", None, 5))
    got = figures.overview(rows, denied, "2026-03", None, date(2026, 3, 5))
    assert (got.requests, got.errors, got.refusals) == (16, 3, 6)
    table = figures.spend_table(figures.scoped(rows, "2026-03", "acme"), denied, "model")
    assert table.select("model", "requests", "errors", "refusals").rows() == [
        ("openai/gpt", 14, 3, 4), ("openai/gtp-4o", 2, 0, 2)]
    assert table["errors"].sum() == got.errors and table["refusals"].sum() == got.refusals


def test_overview_errors_never_go_negative():
    one = costs((date(2026, 3, 1), "acme", "openai", "openai/gpt", "unified", 2, 1, "1", 0, 1.0, 1.0))
    many = refused((date(2026, 3, 1), "acme", "denied", "openai/gpt", 2))
    got = figures.overview(one, many, "2026-03", None, date(2026, 3, 5))
    assert got.errors == 0 and got.refusals == 2



def test_unpriced_models_lists_what_to_price_most_requests_first():
    rows = costs((date(2026, 3, 2), "globex", "openai", "openai/new", "unified", 4, 0, None, 4, None, None),
                 (date(2026, 3, 9), "acme", "openai", "openai/new", "byok", 2, 0, "0.10", 1, 1.0, 1.0),
                 (date(2026, 3, 4), "acme", "anthropic", "anthropic/beta", "unified", 4, 0, None, 4, None, None),
                 (date(2026, 3, 5), "acme", "anthropic", "anthropic/zeta", "unified", 4, 0, None, 4, None, None),
                 (date(2026, 3, 6), "acme", "openai", "openai/gpt", "unified", 9, 0, "1.00", 0, 1.0, 1.0),  # priced
                 (date(2026, 2, 7), "acme", "openai", "openai/old", "unified", 5, 0, None, 5, None, None))  # February
    expected = pl.DataFrame({"model": ["openai/new", "anthropic/beta", "anthropic/zeta"],  # ties by model
                             "unpriced_requests": [5, 4, 4], "tenants": ["acme, globex", "acme", "acme"],
                             "last_seen": [date(2026, 3, 9), date(2026, 3, 4), date(2026, 3, 5)]})
    assert_frame_equal(figures.unpriced_models(rows, "2026-03", None), expected)
    assert_frame_equal(figures.unpriced_models(rows, "2026-03", "globex"), pl.DataFrame(
        {"model": ["openai/new"], "unpriced_requests": [4], "tenants": ["globex"], "last_seen": [date(2026, 3, 2)]}))
    assert figures.unpriced_models(rows, "2026-01", None).is_empty()

# --- spend over time -------------------------------------------------------------------------------------
def test_spend_by_dimension_per_day():
    rows = costs((date(2026, 3, 2), "acme", "openai", "openai/a", "unified", 1, 0, "1.25", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "openai", "openai/b", "unified", 2, 0, "0.50", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "globex", "openai", "openai/a", "unified", 3, 0, "0.25", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "anthropic", "anthropic/c", None, 4, 0, "2.00", 0, 1.0, 1.0))
    assert_frame_equal(figures.spend_by(rows, "provider"), pl.DataFrame(
        {"day": [date(2026, 3, 1), date(2026, 3, 1), date(2026, 3, 2)], "provider": ["anthropic", "openai", "openai"],
         "requests": [4, 5, 1], "cost_usd": [2.0, 0.75, 1.25], "spend": ["$2.00", "$0.75", "$1.25"]}))
    by_mode = figures.spend_by(rows, "billing_mode")
    assert by_mode.filter(pl.col("billing_mode") == "unknown")["cost_usd"].to_list() == [2.0]  # null mode named


def test_spend_by_leaves_refused_and_failed_only_models_out():
    rows = costs((date(2026, 3, 1), "acme", "openai", "openai/gpt-4o-mini", "unified", 2, 0, "0.0002", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "openai", "openai/gpt-4o-mini", None, 3, 3, None, 0, 1.0, 1.0),  # denied
                 (date(2026, 3, 1), "acme", "anthropic", "anthropic/claude-opus-4", None, 5, 5, None, 0, 1.0, 1.0),
                 (date(2026, 3, 2), "acme", "openai", "openai/gpt-4o-mnii", "unified", 1, 1, None, 0, 1.0, 1.0),  # 404
                 (date(2026, 3, 2), "acme", "openai", "openai/free", "unified", 1, 0, "0", 0, 1.0, 1.0),  # free, ok
                 (date(2026, 3, 2), "acme", "openai", "openai/new", "unified", 1, 0, None, 1, 1.0, 1.0))  # unpriced
    assert_frame_equal(figures.spend_by(rows, "model"), pl.DataFrame(
        {"day": [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 2)],
         "model": ["openai/gpt-4o-mini", "openai/free", "openai/new"], "requests": [2, 1, 1],
         "cost_usd": [0.0002, 0.0, None], "spend": ["$0.0002", "$0.00", "—"]}))
    assert figures.spend_by(rows, "billing_mode")["billing_mode"].to_list() == ["unified", "unified"]
    assert figures.spend_by(rows.clear(), "model").columns == ["day", "model", "requests", "cost_usd", "spend"]


def test_days_between_fills_gaps_and_handles_one_day():
    one = costs((date(2026, 3, 5), "acme", "openai", "openai/a", "unified", 1, 0, "1", 0, 1.0, 1.0))
    assert figures.days_between(one) == [date(2026, 3, 5)]
    two = pl.concat([one, costs((date(2026, 3, 2), "acme", "openai", "openai/a", "unified", 1, 0, "1", 0, 1.0, 1.0))])
    assert figures.days_between(two) == [date(2026, 3, 2), date(2026, 3, 3), date(2026, 3, 4), date(2026, 3, 5)]
    assert figures.days_between(one.clear()) == []


def test_spend_table_largest_first():
    rows = costs((date(2026, 3, 1), "acme", "openai", "openai/a", "unified", 1, 1, "1.25", 0, 1.0, 1.0),
                 (date(2026, 3, 2), "acme", "openai", "openai/a", "unified", 2, 0, "0.50", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "globex", "openai", "openai/a", "unified", 3, 0, "2.00", 1, 1.0, 1.0))
    assert_frame_equal(figures.spend_table(rows, refused(), "tenant"), pl.DataFrame(
        {"tenant": ["globex", "acme"], "requests": [3, 3], "errors": [0, 1], "refusals": [0, 0],
         "input_tokens": [300, 300],
         "output_tokens": [30, 30], "cost_usd": pl.Series([D("2.00"), D("1.75")], dtype=MONEY),
         "unpriced_requests": [1, 0]}))


def test_spend_table_keeps_unknown_spend_unknown():
    rows = costs((date(2026, 3, 1), "acme", "openai", "openai/a", "unified", 1, 0, "1.25", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "globex", "openai", "openai/new", "unified", 3, 0, None, 3, 1.0, 1.0))
    table = figures.spend_table(rows, refused(), "tenant")
    assert table.filter(pl.col("tenant") == "globex")["cost_usd"].to_list() == [None]
    assert table["tenant"].to_list() == ["acme", "globex"]  # unknown sorts last


def test_cumulative_spend_runs_through_the_month():
    rows = costs((date(2026, 3, 3), "acme", "openai", "openai/a", "unified", 1, 0, "1.25", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "openai", "openai/a", "unified", 1, 0, "0.50", 0, 1.0, 1.0),
                 (date(2026, 3, 1), "acme", "openai", "openai/b", "unified", 1, 0, "0.25", 0, 1.0, 1.0),
                 (date(2026, 3, 2), "acme", "openai", "openai/n", "unified", 1, 0, None, 1, 1.0, 1.0),
                 (date(2026, 3, 2), "globex", "openai", "openai/a", "unified", 1, 0, "9.00", 0, 1.0, 1.0),
                 (date(2026, 2, 28), "acme", "openai", "openai/a", "unified", 1, 0, "9.00", 0, 1.0, 1.0))
    assert_frame_equal(figures.cumulative_spend(rows, "2026-03", "acme"), pl.DataFrame(
        {"day": [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3)], "spent_usd": [0.75, 0.75, 2.0],
         "spent": ["$0.75", "$0.75", "$2.00"]}))


# --- budgets, users, billing, denials ---------------------------------------------------------------------
def test_budget_burn():
    start = datetime(2026, 3, 1, tzinfo=UTC)
    status = pl.DataFrame([
        (2, "acme", "tenant", None, "month", start, D("100"), D("40"), 40.0, D("120")),
        (3, "acme", "*", "u-1", "day", start, D("5"), D("4.5"), 90.0, D("4.9")),
        (2, "globex", "tenant", None, "month", start, D("10"), D("1"), 10.0, D("3")),
    ], schema=BUDGET_SCHEMA, orient="row")
    burn = figures.budget_burn(status, "acme")
    assert burn.columns == ["tenant", "window", "subject", "user_pseudonym", "spent_usd", "limit_usd", "percent",
                            "forecast_usd", "over_forecast"]
    assert burn.select("subject", "percent", "over_forecast").rows() == [("*", 90.0, False), ("tenant", 40.0, True)]
    assert burn["spent_usd"].to_list() == [D("4.5"), D("40")]
    assert figures.budget_burn(status, None)["tenant"].to_list() == ["acme", "acme", "globex"]
    assert figures.budget_burn(None, "acme").is_empty()
    assert figures.budget_burn(status.clear(), None).columns == burn.columns


def test_top_spenders_by_cost_then_requests():
    users = pl.DataFrame([
        ("2026-03", "acme", "u-a", 5, 1, 1, D("1.00"), 0),
        ("2026-03", "acme", "u-b", 9, 1, 1, D("3.00"), 0),
        ("2026-03", "globex", "u-c", 7, 1, 1, D("1.00"), 0),
        ("2026-03", "acme", "u-d", 50, 1, 1, None, 50),  # unknown cost: last, not first
        ("2026-02", "acme", "u-e", 1, 1, 1, D("99.00"), 0),
    ], schema=USERS_SCHEMA, orient="row")
    top = figures.top_spenders(users, "2026-03", None)
    assert top["user_pseudonym"].to_list() == ["u-b", "u-c", "u-a", "u-d"]
    assert top.columns == ["tenant", "user_pseudonym", "requests", "input_tokens", "output_tokens", "cost_usd",
                           "unpriced_requests"]
    assert figures.top_spenders(users, "2026-03", "acme", limit=2)["user_pseudonym"].to_list() == ["u-b", "u-a"]


def test_spender_bars_label_users_by_pseudonym_prefix():
    top = pl.DataFrame([("2026-03", "acme", "0c9e7a1d-5b2f-4f4e-9a51-1f2d3c4b5a69", 5, 1, 1, D("0.0002"), 0),
                        ("2026-03", "globex", "7d1f0e2c-8a3b-4c5d-9e6f-0a1b2c3d4e5f", 1, 1, 1, None, 1)],
                       schema=USERS_SCHEMA, orient="row").drop("month")
    assert_frame_equal(figures.spender_bars(top), pl.DataFrame(
        {"user": ["acme · 0c9e7a1d", "globex · 7d1f0e2c"], "cost_usd": [0.0002, None], "spend": ["$0.0002", "—"]}))


def test_credit_balances_at_each_tenants_latest_statement():
    statements = pl.DataFrame({
        "period": ["2026-02", "2026-01", "2026-01", "2026-03"],
        "tenant": ["acme", "acme", "globex", "acme"],
        "credits_closing_usd": pl.Series([D("30"), D("45"), D("10"), D("12.5")], dtype=STATEMENT_MONEY),
        "amount_due_usd": pl.Series([D("0"), D("0"), D("3.2"), D("1")], dtype=STATEMENT_MONEY),
    })
    assert_frame_equal(figures.credit_balances(statements, None), pl.DataFrame({
        "tenant": ["acme", "globex"], "period": ["2026-03", "2026-01"],
        "credits_closing_usd": pl.Series([D("12.5"), D("10")], dtype=STATEMENT_MONEY),
        "amount_due_usd": pl.Series([D("1"), D("3.2")], dtype=STATEMENT_MONEY)}))
    assert figures.credit_balances(statements, "globex")["period"].to_list() == ["2026-01"]
    assert figures.credit_balances(statements, "nobody").is_empty()


DENIALS = refused(
    (date(2026, 3, 1), "acme", "denied", "anthropic/c", 2),
    (date(2026, 3, 1), "acme", "denied", "anthropic/d", 3),
    (date(2026, 3, 1), None, "unauthenticated", None, 4),
    (date(2026, 3, 2), "globex", "rate_limited", "openai/a", 1),
    (date(2026, 2, 2), "acme", "denied", "anthropic/c", 50),
)


def test_denials_over_time():
    assert_frame_equal(figures.denials_over_time(DENIALS, "2026-03", None), pl.DataFrame(
        {"day": [date(2026, 3, 1), date(2026, 3, 1), date(2026, 3, 2)],
         "outcome": ["denied", "unauthenticated", "rate_limited"], "count": [5, 4, 1]}))
    assert figures.denials_over_time(DENIALS, "2026-03", "none")["count"].to_list() == [4]  # unattributed
    assert figures.denials_over_time(DENIALS, "2026-04", None).is_empty()


def test_denials_by_model():
    assert figures.denials_by_model(DENIALS, "2026-03", None).rows() == [
        ("none", None, "unauthenticated", 4), ("acme", "anthropic/d", "denied", 3),
        ("acme", "anthropic/c", "denied", 2), ("globex", "openai/a", "rate_limited", 1)]
    assert figures.denials_by_model(DENIALS, "2026-02", "acme").rows() == [("acme", "anthropic/c", "denied", 50)]


# --- dashboard.data: report snapshots -----------------------------------------------------------------------
def write_manifest(reports_dir: Path, **fields_) -> dict:
    manifest = {"built_at": "2026-03-10T12:00:00+00:00", "source_rows": 3,
                "newest_event": "2026-03-10T11:59:00+00:00", "reports": {}, **fields_}
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_read_manifest(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text('{"built_at": "2026-')  # half written
    assert read_manifest(tmp_path) is None
    manifest = write_manifest(tmp_path)
    assert read_manifest(tmp_path) == manifest


def test_read_reports_missing_damaged_and_whole(tmp_path):
    manifest = write_manifest(tmp_path)
    OVERVIEW_COSTS.write_parquet(tmp_path / "tenant_costs.parquet")
    (tmp_path / "denials.parquet").write_bytes(b"PAR1 not really")
    reports = read_reports(tmp_path, manifest)
    assert set(reports.frames) == set(REPORT_NAMES)
    assert_frame_equal(reports.frame("tenant_costs"), OVERVIEW_COSTS)
    assert reports.frame("denials") is None and reports.frame("statements") is None
    assert set(reports.unreadable) == {"denials"}
    assert reports.unreadable["denials"]  # the reason, for the error message
    assert reports.frame("no_such_report") is None


def test_reports_properties():
    manifest = {"built_at": "2026-03-10T12:00:00+00:00", "source_rows": 3, "newest_event": "2026-03-10T11:59:00+00:00"}
    reports = Reports(manifest)
    assert reports.built_at == datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert reports.newest_event == datetime(2026, 3, 10, 11, 59, tzinfo=UTC)
    assert not reports.is_empty
    empty = Reports({**manifest, "source_rows": 0, "newest_event": None})
    assert empty.is_empty and empty.newest_event is None
    never = Reports(None)
    assert never.built_at is None and never.newest_event is None and not never.is_empty


def test_staleness():
    reports = Reports({"built_at": "2026-03-10T12:00:00+00:00", "source_rows": 1})
    built = reports.built_at
    due = 3 * 60 + 60
    assert staleness(reports, 60, built + timedelta(seconds=due)) is None
    assert staleness(reports, 60, built + timedelta(seconds=due + 1)) == due + 1
    assert staleness(reports, 600, built + timedelta(seconds=due + 1)) is None  # a slower schedule
    assert staleness(reports, 60, built + timedelta(days=2)) == 2 * 86400
    assert staleness(Reports(None), 60, built + timedelta(days=2)) is None


# --- dashboard.data: control.db, policy, settings -------------------------------------------------------------
@pytest.fixture
def deployment(tmp_path) -> Path:
    path = tmp_path / "data"
    assert cli_main(["init", str(path)]) == 0
    return path


def store_of(path: Path) -> ControlStore:
    return ControlStore(path / "control.db", Keyring(load_master_key(path)))


def test_read_control_without_a_database(tmp_path):
    snapshot = read_control(tmp_path / "control.db")
    assert snapshot.keys == [] and snapshot.credits.is_empty()
    assert snapshot.last_refused is None and snapshot.last_reloaded is None and snapshot.closed_periods == ()


def test_read_control_shows_keys_without_secrets_credits_audit_and_closed_periods(deployment):
    store = store_of(deployment)
    try:
        store.add_key("operator-openai", "openai", "sk-very-secret-1", None)
        store.add_key("acme-anthropic", "anthropic", "sk-ant-very-secret-2", "acme")
        store.add_credits("globex", D("50"), "prepaid")
        store.audit("policy.refused", "v1", {"errors": ["policy/access.csv:3: error: old"]})
        store.audit("policy.reloaded", "v2", {})
        store.audit("policy.refused", "v3", {"errors": ["policy/access.csv:9: error: new"]})
        store.close_period("2026-01", [])
    finally:
        store.close()
    snapshot = read_control(deployment / "control.db")
    assert [(k.key_id, k.provider, k.owner, k.billing_mode, k.status) for k in snapshot.keys] == [
        ("acme-anthropic", "anthropic", "acme", "byok", "active"),
        ("operator-openai", "openai", "operator", "unified", "active")]
    assert [f.name for f in fields(KeyInfo)] == ["key_id", "provider", "owner", "billing_mode", "status", "health"]
    assert "very-secret" not in repr(snapshot)
    assert snapshot.credits.select("tenant", "amount_usd", "note").rows() == [("globex", "50", "prepaid")]
    assert snapshot.last_refused["version"] == "v3"
    assert snapshot.last_refused["details"]["errors"] == ["policy/access.csv:9: error: new"]
    assert snapshot.last_reloaded["version"] == "v2"
    assert snapshot.last_refused["seq"] > snapshot.last_reloaded["seq"]
    assert snapshot.closed_periods == ("2026-01",)


def test_control_fingerprint_changes_on_a_commit(deployment):
    db = deployment / "control.db"
    assert control_fingerprint(deployment / "nothing.db") == "-;-"
    before = control_fingerprint(db)
    assert control_fingerprint(db) == before
    time.sleep(0.01)
    store = store_of(deployment)
    try:
        store.add_credits("acme", D("1"), None)
    finally:
        store.close()
    assert control_fingerprint(db) != before


def test_read_policy_validates_routes_against_keys(deployment):
    (deployment / "policy" / "routes.csv").write_text("p, *, openai/*, operator-openai\n")  # not the samples'
    view = read_policy(deployment, [])
    [error] = view.errors  # the route names a key that was never added
    assert str(error).startswith("policy/routes.csv:") and "'operator-openai' does not exist" in str(error)
    keys = [KeyInfo("operator-openai", "openai", "operator", "unified", "active", "ok")]
    view = read_policy(deployment, keys)
    assert view.errors == []
    assert {r.tenant for r in view.files.routes} == {"*"}
    assert set(view.files.tenants) == {"acme", "globex"}
    foreign = [KeyInfo("operator-openai", "openai", "globex", "byok", "active", "ok")]  # another tenant's key
    assert any("belongs to tenant 'globex'" in str(p) for p in read_policy(deployment, foreign).errors)


def test_policy_fingerprint_changes_with_any_policy_file_or_pricing(deployment):
    before = policy_fingerprint(deployment)
    assert policy_fingerprint(deployment) == before
    access = deployment / "policy" / "access.csv"
    access.write_text(access.read_text() + "p, *, globex, gemini/*, deny\n")
    edited = policy_fingerprint(deployment)
    assert edited != before
    pricing = deployment / "pricing.csv"
    stat = pricing.stat()
    os.utime(pricing, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert policy_fingerprint(deployment) != edited


def test_report_interval_from_tollway_toml(deployment):
    assert report_interval_s(deployment) == 60
    toml = deployment / "tollway.toml"
    assert "report_interval_s = 60" in toml.read_text()
    toml.write_text(toml.read_text().replace("report_interval_s = 60", "report_interval_s = 15"))
    assert report_interval_s(deployment) == 15
    toml.write_text("[pipeline\nbroken")
    assert report_interval_s(deployment) == 60
