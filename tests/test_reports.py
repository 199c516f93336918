"""The report math on hand-built events: keys, counts, exact money, latency percentiles, determinism."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analytics.reports import REFUSALS, denials, tenant_costs, user_costs, with_periods

#: The events as DuckDB hands them to Polars (`load_events`).
EVENT_SCHEMA = {
    "ts": pl.Datetime("us", "UTC"),
    "tenant": pl.String,
    "user_pseudonym": pl.String,
    "provider": pl.String,
    "model": pl.String,
    "billing_mode": pl.String,
    "outcome": pl.String,
    "status_code": pl.Int32,
    "input_tokens": pl.Int64,
    "output_tokens": pl.Int64,
    "cached_input_tokens": pl.Int64,
    "usage_source": pl.String,
    "cost_usd": pl.Decimal(18, 9),
    "latency_ms": pl.Float64,
}
#: Sums of DECIMAL(18,9) widen to the largest precision and keep the scale.
MONEY = pl.Decimal(38, 9)

TENANT_COSTS_SCHEMA = {
    "day": pl.Date, "tenant": pl.String, "provider": pl.String, "model": pl.String, "billing_mode": pl.String,
    "requests": pl.Int64, "errors": pl.Int64, "input_tokens": pl.Int64, "output_tokens": pl.Int64,
    "cached_input_tokens": pl.Int64, "cost_usd": MONEY, "unpriced_requests": pl.Int64,
    "p50_latency_ms": pl.Float64, "p95_latency_ms": pl.Float64,
}
USER_COSTS_SCHEMA = {
    "month": pl.String, "tenant": pl.String, "user_pseudonym": pl.String, "requests": pl.Int64,
    "input_tokens": pl.Int64, "output_tokens": pl.Int64, "cost_usd": MONEY, "unpriced_requests": pl.Int64,
}
DENIALS_SCHEMA = {"day": pl.Date, "tenant": pl.String, "outcome": pl.String, "model": pl.String, "count": pl.Int64}

U1 = "0b7c1c52-9d1e-8a41-8f00-000000000001"
U2 = "0b7c1c52-9d1e-8a41-8f00-000000000002"
U3 = "0b7c1c52-9d1e-8a41-8f00-000000000003"
GPT = ("openai", "openai/gpt-4o-mini")
CLAUDE = ("anthropic", "anthropic/claude-sonnet-4")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def event(ts: str, tenant: str | None = "acme", *, user: str | None = U1, route=GPT, billing: str | None = "unified",
          outcome: str = "ok", status: int = 200, tokens: tuple | None = (0, 0, 0), usage: str = "reported",
          cost: str | None = "0", latency: float | None = 10.0) -> dict:
    provider, model = route if route else (None, None)
    input_tokens, output_tokens, cached = tokens if tokens else (None, None, None)
    return {"ts": at(ts), "tenant": tenant, "user_pseudonym": user, "provider": provider, "model": model,
            "billing_mode": billing, "outcome": outcome, "status_code": status, "input_tokens": input_tokens,
            "output_tokens": output_tokens, "cached_input_tokens": cached, "usage_source": usage,
            "cost_usd": None if cost is None else Decimal(cost), "latency_ms": latency}


def refusal(ts: str, outcome: str, tenant: str | None = "acme", route=GPT, status: int = 403) -> dict:
    """What the gateway records when it refuses a request itself: no key, no usage, no cost."""
    return event(ts, tenant, route=route, billing=None, outcome=outcome, status=status, tokens=None, usage="none",
                 cost=None, latency=1.0)


def frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=EVENT_SCHEMA)


def run(report, rows_or_frame) -> pl.DataFrame:
    events = rows_or_frame if isinstance(rows_or_frame, pl.DataFrame) else frame(rows_or_frame)
    return report(events.lazy()).collect()


def expected(schema: dict, rows: list[tuple]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=schema, orient="row")


# A day of mixed traffic: priced, unpriced, failed and refused requests, around UTC midnight.
EVENTS = [
    # acme / openai / unified on 2025-03-01: two priced answers and one upstream failure without usage.
    event("2025-03-01T00:00:00", tokens=(100, 20, 10), cost="0.100000000", latency=100.0),
    event("2025-03-01T12:00:00", user=U2, tokens=(200, 40, 0), cost="0.200000000", latency=300.0),
    event("2025-03-01T23:59:59.999999", outcome="upstream_error", status=502, tokens=None, usage="none", cost=None,
          latency=200.0),
    # ... and one a microsecond later: the next UTC day.
    event("2025-03-02T00:00:00", tokens=(1, 1, 0), cost="0.000000001", latency=50.0),
    # acme / anthropic / byok: one of them has usage but no price (an unknown model price): unpriced.
    event("2025-03-01T08:00:00", route=CLAUDE, billing="byok", tokens=(10, 5, 0), cost="0.001000000", latency=30.0),
    event("2025-03-01T09:00:00", route=CLAUDE, billing="byok", tokens=(20, 5, 5), usage="estimated", cost=None,
          latency=10.0),
    event("2025-03-01T10:00:00", route=CLAUDE, billing="byok", tokens=(30, 5, 0), cost="0.002000000", latency=20.0),
    # globex is refused by policy: no key was chosen, so no billing mode.
    refusal("2025-03-01T15:00:00", "denied", tenant="globex"),
    # Unauthenticated: no tenant, no model; not a tenant's cost.
    refusal("2025-03-01T16:00:00", "unauthenticated", tenant=None, route=None, status=401),
]


def test_tenant_costs_groups_counts_and_sums_per_day_tenant_provider_model_and_billing_mode():
    got = run(tenant_costs, EVENTS)
    want = expected(TENANT_COSTS_SCHEMA, [
        (date(2025, 3, 1), "acme", "anthropic", "anthropic/claude-sonnet-4", "byok",
         3, 0, 60, 15, 5, Decimal("0.003"), 1, 20.0, 30.0),
        (date(2025, 3, 1), "acme", "openai", "openai/gpt-4o-mini", "unified",
         3, 1, 300, 60, 10, Decimal("0.3"), 0, 200.0, 300.0),
        (date(2025, 3, 1), "globex", "openai", "openai/gpt-4o-mini", None,  # refused: no cost is known, null
         1, 1, 0, 0, 0, None, 0, 1.0, 1.0),
        (date(2025, 3, 2), "acme", "openai", "openai/gpt-4o-mini", "unified",
         1, 0, 1, 1, 0, Decimal("0.000000001"), 0, 50.0, 50.0),
    ])
    assert_frame_equal(got, want, check_exact=True)


def test_tenant_costs_money_is_an_exact_decimal_sum():
    # 0.1 + 0.2 is not 0.3 in binary floating point; a thousand nano-dollars must add up to one micro-dollar.
    rows = [event("2025-03-01T10:00:00", cost="0.1"), event("2025-03-01T11:00:00", cost="0.2")]
    rows += [event("2025-03-01T12:00:00", route=CLAUDE, cost="0.000000001") for _ in range(1000)]
    got = run(tenant_costs, rows)
    assert got.schema["cost_usd"] == MONEY
    assert got["cost_usd"].to_list() == [Decimal("0.000001000"), Decimal("0.300000000")]
    large = [event("2025-03-01T10:00:00", cost="999999999.999999999") for _ in range(3)]
    assert run(tenant_costs, large)["cost_usd"].to_list() == [Decimal("2999999999.999999997")]


def test_unpriced_requests_are_counted_apart_and_not_added_to_the_cost():
    rows = [
        event("2025-03-01T10:00:00", cost="0.5"),
        event("2025-03-01T10:01:00", tokens=(7, 3, 0), usage="reported", cost=None),   # usage, no price
        event("2025-03-01T10:02:00", tokens=(7, 3, 0), usage="estimated", cost=None),  # estimated, no price
        event("2025-03-01T10:03:00", outcome="timeout", status=504, tokens=None, usage="none", cost=None),  # no usage
    ]
    [row] = run(tenant_costs, rows).to_dicts()
    assert (row["requests"], row["errors"], row["unpriced_requests"]) == (4, 1, 2)
    assert (row["input_tokens"], row["output_tokens"]) == (14, 6)
    assert row["cost_usd"] == Decimal("0.5")


def test_latency_percentiles_take_the_nearest_observed_value():
    seven = [10.0, 40.0, 70.0, 30.0, 60.0, 20.0, 50.0]  # linear interpolation would give p95 = 67
    twenty_one = [float(v) for v in (13, 2, 21, 8, 1, 17, 5, 20, 11, 3, 19, 7, 15, 9, 4, 18, 12, 6, 16, 10, 14)]
    rows = [event(f"2025-03-01T10:{i:02d}:00", latency=v) for i, v in enumerate(seven)]
    rows += [event(f"2025-03-01T11:{i:02d}:00", route=CLAUDE, latency=v) for i, v in enumerate(twenty_one)]
    got = run(tenant_costs, rows).select("model", "p50_latency_ms", "p95_latency_ms")
    assert_frame_equal(got, pl.DataFrame({"model": ["anthropic/claude-sonnet-4", "openai/gpt-4o-mini"],
                                          "p50_latency_ms": [11.0, 40.0], "p95_latency_ms": [20.0, 70.0]}))


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Los_Angeles", "Pacific/Kiritimati", "Pacific/Pago_Pago"])
def test_days_and_months_are_utc_whatever_the_time_zone_of_the_timestamps(zone):
    rows = [event("2025-03-31T23:30:00", cost="0.1"), event("2025-04-01T00:30:00", cost="0.2"),
            event("2025-02-28T23:59:59", cost="0.4")]
    in_utc = frame(rows)
    local = in_utc.with_columns(pl.col("ts").dt.convert_time_zone(zone))
    assert local["ts"].dt.date().to_list() != in_utc["ts"].dt.date().to_list()  # the zone does move the dates
    periods = with_periods(local.lazy()).collect()
    assert periods["day"].to_list() == [date(2025, 3, 31), date(2025, 4, 1), date(2025, 2, 28)]
    assert periods["month"].to_list() == ["2025-03", "2025-04", "2025-02"]
    for report in (tenant_costs, user_costs, denials):
        assert_frame_equal(run(report, local), run(report, in_utc), check_exact=True)
    assert run(tenant_costs, local)["day"].to_list() == [date(2025, 2, 28), date(2025, 3, 31), date(2025, 4, 1)]


def test_user_costs_per_month_tenant_and_pseudonym():
    rows = [
        event("2025-02-28T23:59:59", user=U1, tokens=(5, 1, 0), cost="0.010000000"),
        event("2025-03-01T00:00:00", user=U1, tokens=(10, 2, 0), cost="0.020000000"),
        event("2025-03-31T23:30:00", user=U1, route=CLAUDE, billing="byok", tokens=(20, 4, 0), cost="0.030000000"),
        event("2025-03-15T12:00:00", user=U1, tokens=(1, 1, 0), usage="reported", cost=None),  # unpriced
        event("2025-03-10T12:00:00", user=U2, tokens=(100, 50, 0), cost="1.000000001"),
        event("2025-03-10T12:00:00", tenant="globex", user=U3, tokens=(3, 3, 0), cost="0.000000003"),
        event("2025-03-10T13:00:00", user=None, tokens=(999, 999, 0), cost="9"),  # no user (e.g. an API key): left out
        refusal("2025-03-11T13:00:00", "rate_limited", tenant="acme") | {"user_pseudonym": U2},
    ]
    want = expected(USER_COSTS_SCHEMA, [
        ("2025-02", "acme", U1, 1, 5, 1, Decimal("0.01"), 0),
        ("2025-03", "acme", U1, 3, 31, 7, Decimal("0.05"), 1),
        ("2025-03", "acme", U2, 2, 100, 50, Decimal("1.000000001"), 0),
        ("2025-03", "globex", U3, 1, 3, 3, Decimal("0.000000003"), 0),
    ])
    assert_frame_equal(run(user_costs, rows), want, check_exact=True)


def test_a_group_with_only_unpriced_usage_has_no_cost_not_a_zero_cost():
    rows = [event("2025-03-01T10:00:00", usage="reported", cost=None),
            event("2025-03-01T11:00:00", usage="estimated", cost=None)]
    for report in (tenant_costs, user_costs):
        [row] = run(report, rows).to_dicts()
        assert row["cost_usd"] is None and row["unpriced_requests"] == 2


def test_denials_count_only_the_gateways_own_refusals():
    rows = [event("2025-03-01T10:00:00"),
            event("2025-03-01T10:00:01", outcome="upstream_error", status=502, tokens=None, usage="none", cost=None),
            event("2025-03-01T10:00:02", outcome="timeout", status=504, tokens=None, usage="none", cost=None),
            event("2025-03-01T10:00:03", outcome="cancelled", status=499, tokens=None, usage="none", cost=None),
            refusal("2025-03-01T11:00:00", "denied"),
            refusal("2025-03-01T11:30:00", "denied"),
            refusal("2025-03-01T12:00:00", "denied", route=CLAUDE),
            refusal("2025-03-01T12:00:00", "rate_limited", status=429),
            refusal("2025-03-01T23:59:59", "budget_exceeded", status=402),
            refusal("2025-03-02T00:00:00", "budget_exceeded", status=402),
            refusal("2025-03-01T13:00:00", "bad_request", route=None, status=400),
            refusal("2025-03-01T14:00:00", "unauthenticated", tenant=None, route=None, status=401),
            refusal("2025-03-01T14:00:01", "unauthenticated", tenant=None, route=None, status=401),
            refusal("2025-03-01T14:00:02", "denied", tenant="globex")]
    want = expected(DENIALS_SCHEMA, [
        (date(2025, 3, 1), "acme", "bad_request", None, 1),
        (date(2025, 3, 1), "acme", "budget_exceeded", "openai/gpt-4o-mini", 1),
        (date(2025, 3, 1), "acme", "denied", "anthropic/claude-sonnet-4", 1),
        (date(2025, 3, 1), "acme", "denied", "openai/gpt-4o-mini", 2),
        (date(2025, 3, 1), "acme", "rate_limited", "openai/gpt-4o-mini", 1),
        (date(2025, 3, 1), "globex", "denied", "openai/gpt-4o-mini", 1),
        (date(2025, 3, 1), None, "unauthenticated", None, 2),
        (date(2025, 3, 2), "acme", "budget_exceeded", "openai/gpt-4o-mini", 1),
    ])
    assert_frame_equal(run(denials, rows), want, check_exact=True)
    assert set(REFUSALS) == {"denied", "rate_limited", "budget_exceeded", "unauthenticated", "bad_request"}


def test_no_events_give_empty_reports_with_the_same_columns():
    for report, schema in ((tenant_costs, TENANT_COSTS_SCHEMA), (user_costs, USER_COSTS_SCHEMA),
                           (denials, DENIALS_SCHEMA)):
        got = run(report, [])
        assert got.height == 0 and dict(got.schema) == schema


def _many_events() -> list[dict]:
    rows = list(EVENTS)
    start = at("2025-03-01T00:00:00")
    for i in range(300):
        ts = (start + timedelta(minutes=37 * i)).isoformat().replace("+00:00", "")
        rows.append(event(ts, tenant=("acme", "globex")[i % 2], user=(U1, U2, U3)[i % 3], route=(GPT, CLAUDE)[i % 2],
                          billing=("unified", "byok")[i % 2], tokens=(i, i % 7, i % 3),
                          cost=None if i % 11 == 0 else f"0.{i:09d}", latency=float((i * 7919) % 1000)))
        if i % 13 == 0:
            rows.append(refusal(ts, ("denied", "rate_limited")[i % 2]))
    return rows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_same_events_in_any_order_give_identical_reports(seed):
    ordered = frame(_many_events())
    shuffled = ordered.sample(fraction=1.0, shuffle=True, seed=seed)
    assert not shuffled.equals(ordered)
    for report in (tenant_costs, user_costs, denials):
        first, second = run(report, ordered), run(report, shuffled)
        assert first.height > 0
        assert_frame_equal(first, second, check_exact=True)
        assert first.write_csv() == second.write_csv()
