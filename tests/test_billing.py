"""Unified-billing statements against hand computations (exact decimals, cents half-up only at the end)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal as D

import polars as pl

from analytics.billing import Credit, PeriodUsage, cents, months, statements
from analytics.jobs import BillingInputs, statement_frame
from policy.files import Tenant

TENANTS = {"acme": Tenant("acme", "Acme", D("12"), D("2.5")), "globex": Tenant("globex", "Globex", D("0"), D("0"))}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_cents_round_half_up_not_half_even():
    assert [cents(D(v)) for v in ("0.005", "0.015", "0.0049", "2.675", "-0.005")] == [
        D("0.01"), D("0.02"), D("0.00"), D("2.68"), D("-0.01")]


def test_every_column_by_hand():
    usage = [PeriodUsage("2025-03", "acme", D("10.005"), D("40.004"), 3)]
    [s] = statements(usage, [Credit("acme", D("5"), at("2025-03-02T10:00:00"))], TENANTS, "2025-03")
    # unified 10.005 -> 10.01; markup 12 % of 10.005 = 1.2006 -> 1.20; byok 40.004 -> 40.00;
    # fee 2.5 % of 40.004 = 1.0001 -> 1.00; charges = 10.01 + 1.20 + 1.00 = 12.21
    assert (s.unified_cost_usd, s.markup_usd, s.byok_cost_usd, s.byok_fee_usd) == (D("10.01"), D("1.20"),
                                                                                 D("40.00"), D("1.00"))
    assert s.charges_usd == D("12.21")
    assert (s.credits_opening_usd, s.credits_added_usd, s.credits_applied_usd, s.credits_closing_usd) == (
        D("0"), D("5.00"), D("5.00"), D("0.00"))
    assert s.amount_due_usd == D("7.21") and s.unpriced_requests == 3


def test_credits_carry_over_across_periods_including_idle_ones():
    usage = [PeriodUsage("2025-01", "acme", D("30"), D("0"), 0), PeriodUsage("2025-03", "acme", D("100"), D("0"), 0)]
    credits = [Credit("acme", D("50"), at("2024-12-20T00:00:00")), Credit("acme", D("70"), at("2025-02-10T00:00:00"))]
    rows = statements(usage, credits, TENANTS, "2025-03")
    assert [s.period for s in rows] == ["2024-12", "2025-01", "2025-02", "2025-03"]
    dec, jan, feb, mar = rows
    assert (dec.charges_usd, dec.credits_closing_usd) == (D("0.00"), D("50.00"))
    # January: 30 + 12 % markup = 33.60 charged, all paid from 50 of credit
    assert (jan.charges_usd, jan.credits_applied_usd, jan.credits_closing_usd, jan.amount_due_usd) == (
        D("33.60"), D("33.60"), D("16.40"), D("0.00"))
    assert (feb.credits_opening_usd, feb.credits_added_usd, feb.credits_closing_usd) == (D("16.40"), D("70.00"),
                                                                                         D("86.40"))
    # March: 112.00 charged, 86.40 of credit left, 25.60 due
    assert (mar.charges_usd, mar.credits_applied_usd, mar.credits_closing_usd, mar.amount_due_usd) == (
        D("112.00"), D("86.40"), D("0.00"), D("25.60"))


def test_byok_is_informational_only_its_fee_is_charged():
    [s] = statements([PeriodUsage("2025-03", "acme", D("0"), D("1000"), 0)], [], TENANTS, "2025-03")
    assert (s.byok_cost_usd, s.byok_fee_usd, s.charges_usd) == (D("1000.00"), D("25.00"), D("25.00"))


def test_tenants_are_separate_and_output_is_sorted():
    usage = [PeriodUsage("2025-03", "globex", D("1"), D("0"), 0), PeriodUsage("2025-03", "acme", D("1"), D("0"), 0)]
    rows = statements(reversed(usage), [], TENANTS, "2025-03")
    assert [(s.period, s.tenant, s.charges_usd) for s in rows] == [("2025-03", "acme", D("1.12")),
                                                                    ("2025-03", "globex", D("1.00"))]


def test_months_cross_a_year():
    assert months("2024-11", "2025-02") == ["2024-11", "2024-12", "2025-01", "2025-02"]
    assert months("2025-03", "2025-02") == []


def test_statement_frame_from_events_is_exact_and_typed():
    events = pl.DataFrame({
        "ts": [at("2025-03-01T10:00:00"), at("2025-03-02T10:00:00"), at("2025-03-03T10:00:00"),
               at("2025-03-04T10:00:00")],
        "tenant": ["acme"] * 4, "billing_mode": ["unified", "unified", "byok", "unified"],
        "usage_source": ["reported", "reported", "reported", "reported"],
        "cost_usd": [D("0.100000001"), D("0.200000002"), D("4"), None],
    }, schema_overrides={"cost_usd": pl.Decimal(18, 9), "ts": pl.Datetime("us", "UTC")})
    from analytics.reports import period_usage

    frame = statement_frame(period_usage(events.lazy()).collect(), BillingInputs(TENANTS, []), "2025-03")
    [row] = frame.to_dicts()
    assert frame.schema["charges_usd"] == pl.Decimal(18, 2)
    # unified 0.300000003 -> 0.30, markup 0.036 -> 0.04, byok fee 0.10 -> 0.10: charges 0.44
    assert (row["unified_cost_usd"], row["markup_usd"], row["byok_fee_usd"], row["charges_usd"]) == (
        D("0.30"), D("0.04"), D("0.10"), D("0.44"))
    assert row["unpriced_requests"] == 1


def test_report_run_writes_statements_with_the_cli_credits(deployment):
    import uuid

    from proxy.events import Event
    from proxy.recorder import EventRecorder, open_events_db
    from tests.helpers import run_cli

    con = open_events_db(deployment.path / "events.duckdb")
    recorder = EventRecorder(con)
    now = datetime.now(UTC)
    for cost, mode in ((D("40"), "unified"), (D("60"), "unified"), (D("100"), "byok")):
        recorder.record(Event(event_id=uuid.uuid4(), ts=now, tenant="acme", provider="openai",
                              model="openai/gpt-4o", status_code=200, billing_mode=mode, input_tokens=1,
                              output_tokens=1, usage_source="reported", cost_usd=cost, attempts=1))
    recorder.close()
    con.close()
    assert run_cli(deployment.path, "credits", "add", "--tenant", "acme", "--amount", "50").returncode == 0

    result = run_cli(deployment.path, "report", "run", "--json")
    assert result.returncode == 0, result.stderr
    [row] = pl.read_csv(deployment.path / "reports" / "statements.csv", infer_schema=False).to_dicts()
    # sample tenants.csv: acme has 0 % markup and a 2.5 % BYOK fee: 100 + 2.50 = 102.50, 50 credit applied
    assert (row["period"], row["unified_cost_usd"], row["byok_fee_usd"], row["charges_usd"]) == (
        now.strftime("%Y-%m"), "100.00", "2.50", "102.50")
    assert (row["credits_applied_usd"], row["amount_due_usd"]) == ("50.00", "52.50")


def test_budget_status_spent_percent_and_forecast():
    from analytics.reports import budget_status
    from policy.files import LimitRule

    now = at("2025-03-11T00:00:00")  # 10 of March's 31 days have passed
    events = pl.DataFrame({
        "ts": [at("2025-03-02T00:00:00"), at("2025-03-05T00:00:00"), at("2025-02-27T00:00:00"),
               at("2025-03-06T00:00:00"), at("2025-03-07T00:00:00")],
        "tenant": ["acme", "acme", "acme", "acme", "globex"],
        "user_pseudonym": ["u1", "u2", "u1", "u1", "g1"],
        "outcome": ["ok", "ok", "ok", "budget_exceeded", "ok"],
        "cost_usd": [D("30"), D("20"), D("999"), None, D("7")],
    }, schema_overrides={"cost_usd": pl.Decimal(18, 9), "ts": pl.Datetime("us", "UTC")})
    limits = [LimitRule(2, "acme", "tenant", "usd", "month", D("200")), LimitRule(3, "*", "*", "usd", "month", D("40")),
              LimitRule(4, "acme", "role:interns", "usd", "day", D("5")),
              LimitRule(5, "acme", "tenant", "requests", "minute", D("60"))]
    rows = budget_status(events.lazy(), limits, now).to_dicts()
    tenant_row = next(r for r in rows if r["line"] == 2)
    assert (tenant_row["spent_usd"], tenant_row["percent"]) == (D("50"), 25.0)  # February's 999 is another window
    assert tenant_row["forecast_usd"] == D("155.000000000")  # 50 / 10 days × 31 days
    per_user = sorted((r["tenant"], r["user_pseudonym"], r["spent_usd"]) for r in rows if r["line"] == 3)
    assert per_user == [("acme", "u1", D("30")), ("acme", "u2", D("20")), ("globex", "g1", D("7"))]
    assert {r["line"] for r in rows} == {2, 3}  # role budgets and non-usd limits are not listed


def test_a_closed_period_stays_frozen_and_late_events_are_charged_next_period():
    frozen = statements([PeriodUsage("2025-03", "globex", D("10"), D("0"), 0)], [], TENANTS, "2025-03")[0]
    late = [PeriodUsage("2025-03", "globex", D("14.50"), D("0"), 0),  # 4.50 arrived after the close
            PeriodUsage("2025-04", "globex", D("1"), D("0"), 0)]
    mar, apr = statements(late, [], TENANTS, "2025-04", closed={("2025-03", "globex"): frozen.row()})
    assert mar.closed and mar.charges_usd == D("10.00") and mar.unified_cost_usd == D("10.00")
    assert not apr.closed and apr.adjustments_usd == D("4.50")
    assert (apr.charges_usd, apr.amount_due_usd) == (D("5.50"), D("5.50"))


def test_report_close_freezes_and_later_events_become_an_adjustment(deployment):
    import uuid

    from proxy.events import Event
    from proxy.recorder import EventRecorder, open_events_db
    from tests.helpers import run_cli

    def add_events(*costs: str) -> None:
        con = open_events_db(deployment.path / "events.duckdb")
        recorder = EventRecorder(con)
        for cost in costs:
            recorder.record(Event(event_id=uuid.uuid4(), ts=at("2025-10-15T12:00:00"), tenant="globex",
                                  provider="openai", model="openai/gpt-4o", status_code=200, billing_mode="unified",
                                  input_tokens=1, output_tokens=1, usage_source="reported", cost_usd=D(cost),
                                  attempts=1))
        recorder.close()
        con.close()

    add_events("20")
    closed = run_cli(deployment.path, "report", "close", "--period", "2025-10")
    assert closed.returncode == 0, closed.stderr
    again = run_cli(deployment.path, "report", "close", "--period", "2025-10")
    assert again.returncode == 1 and "closed already" in again.stderr
    assert run_cli(deployment.path, "report", "close", "--period", "2999-01").returncode == 1
    assert run_cli(deployment.path, "report", "close", "--period", "2025-13").returncode == 1

    add_events("3.25")  # arrives after the close
    assert run_cli(deployment.path, "report", "run").returncode == 0
    rows = {r["period"]: r for r in pl.read_csv(deployment.path / "reports" / "statements.csv",
                                                 infer_schema=False).to_dicts() if r["tenant"] == "globex"}
    # globex: 12 % markup. October was closed at 20.00 + 2.40; the late 3.25 (+0.39) is charged in November
    assert (rows["2025-10"]["charges_usd"], rows["2025-10"]["closed"]) == ("22.40", "true")
    assert (rows["2025-11"]["adjustments_usd"], rows["2025-11"]["charges_usd"]) == ("3.64", "3.64")
    audit = run_cli(deployment.path, "audit", "--action", "period.closed", "--json")
    assert '"period.closed"' in audit.stdout and "22.40" in audit.stdout


def test_retention_deletes_only_old_events_of_closed_periods(tmp_path):
    import uuid

    from analytics.jobs import apply_retention
    from proxy.events import Event
    from proxy.recorder import EventRecorder, open_events_db

    con = open_events_db(tmp_path / "events.duckdb")
    recorder = EventRecorder(con)
    for ts in ("2024-01-10T00:00:00", "2024-01-20T00:00:00", "2024-02-10T00:00:00", "2025-06-01T00:00:00"):
        recorder.record(Event(event_id=uuid.uuid4(), ts=at(ts), tenant="acme", status_code=200))
    recorder.close()
    now = at("2025-06-02T00:00:00")
    assert apply_retention(con, 400, set(), now) == 0  # nothing closed: nothing deleted, however old
    assert apply_retention(con, 400, {"2024-01", "2025-06"}, now) == 2  # old and closed only
    months_left = sorted(r[0] for r in con.execute("SELECT strftime(ts, '%Y-%m') FROM events").fetchall())
    assert months_left == ["2024-02", "2025-06"]
    con.close()


def test_report_run_period_prints_that_periods_statements(deployment):
    from tests.helpers import run_cli

    test_report_run_writes_statements_with_the_cli_credits(deployment)
    period = datetime.now(UTC).strftime("%Y-%m")
    result = run_cli(deployment.path, "report", "run", "--period", period)
    assert result.returncode == 0, result.stderr
    assert f"{period} acme" in result.stdout and "102.50" in result.stdout and "52.50" in result.stdout
    assert run_cli(deployment.path, "report", "run", "--period", "2026-1").returncode == 1
