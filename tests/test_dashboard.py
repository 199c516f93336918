"""The Streamlit dashboard, page by page, through Streamlit's own `AppTest` (no browser).

Every figure a page shows is checked against the report files themselves, read here independently
with Polars from `<deployment>/reports/*.parquet`, and the policy tables against the CSV files.
The history deployment (real event writer, real report job) is built once per module; other states
(never built, built from no events, stale, damaged, missing, invalid policy) get their own cheap
temporary deployments.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest
import streamlit as st
import streamlit.testing.v1.app_test as app_test_module
from polars.testing import assert_frame_equal
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

import dashboard
from analytics.csv_safety import write_csv
from analytics.jobs import build_reports, load_billing_inputs
from dashboard.figures import LABELS, label, money
from proxy.cli import main as cli_main
from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key
from proxy.events import COLUMNS, CREATE_TABLE, Event, Pseudonymizer
from proxy.limiter import ADMITTED
from tests.helpers import HISTORY_WORKLOADS, deployment_with_history, free_port

APP = str((Path(dashboard.__file__).parent / "streamlit_app.py").resolve())
PAGES = ("overview", "tenants", "billing", "users", "policy")
#: Pages that draw report figures and therefore must explain missing, empty or stale reports.
REPORT_PAGES = ("overview", "tenants", "billing", "users")
STATEMENT_COLUMNS = ["period", "tenant", "unified_cost_usd", "markup_usd", "byok_cost_usd", "byok_fee_usd",
                     "charges_usd", "credits_opening_usd", "credits_added_usd", "credits_applied_usd",
                     "credits_closing_usd", "amount_due_usd", "unpriced_requests", "adjustments_usd", "closed"]


# --- fixtures and helpers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    """40 days of synthetic traffic for acme and globex, written and reported by the real code."""
    return deployment_with_history(tmp_path_factory.mktemp("history") / "data", days=40).path


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Each test starts from empty Streamlit caches (loads are cached per process)."""
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


@pytest.fixture
def downloads(monkeypatch) -> list[MemoryMediaFileStorage]:
    """The media storages AppTest creates, kept so a download button's bytes can be fetched by URL."""
    stores: list[MemoryMediaFileStorage] = []

    class Recording(MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return stores


def open_app(monkeypatch, data_dir: Path, page: str | None = None, period: str | None = None) -> AppTest:
    """Run the dashboard on `data_dir` (pick `period`, switch to `page`); no page may raise."""
    monkeypatch.setenv("TOLLWAY_DATA_DIR", str(data_dir))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    if period is not None:
        choose(at, "period", period)
    if page is not None:
        goto(at, page)
    return at


def goto(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def choose(at: AppTest, key: str, value: str) -> AppTest:
    at.selectbox(key=key).set_value(value).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert len(found) == 1, f"metric {label!r}: {[m.label for m in at.metric]}"
    return found[0]


def table(at: AppTest, *columns: str, exact: bool = False) -> pl.DataFrame:
    """The one table on the page that has all these columns (`exact`: only these), as a Polars frame.
    Columns are named as in the reports (`cost_usd`); the page shows their labels (`Cost (USD)`), which
    are mapped back here."""
    headers = [label(c) for c in columns]
    found = [df.value for df in at.dataframe
             if (list(df.value.columns) == headers if exact else set(headers) <= set(df.value.columns))]
    assert len(found) == 1, f"{len(found)} tables with {headers}: {[list(d.value.columns) for d in at.dataframe]}"
    names = {header: name for name, header in LABELS.items()}
    return pl.from_pandas(found[0]).rename(lambda header: names.get(header, header))


def headers(at: AppTest) -> list[list[str]]:
    """The headers of every table on the page, as shown."""
    return [list(df.value.columns) for df in at.dataframe]


def cells(at: AppTest) -> set[str]:
    """The text of every table cell on the page, as the table widget gets it."""
    return {str(v) for df in at.dataframe for column in df.value.columns for v in df.value[column].tolist()}


def texts(at: AppTest, kind: str) -> list[str]:
    return [e.value for e in getattr(at, kind)]


def chart(at: AppTest, title: str) -> tuple[dict, pl.DataFrame]:
    """The Vega-Lite spec and the data of the one chart with this title."""
    found = [c for c in at.get("vega_lite_chart") if json.loads(c.proto.spec).get("title") == title]
    assert len(found) == 1, [json.loads(c.proto.spec).get("title") for c in at.get("vega_lite_chart")]
    [dataset] = found[0].proto.datasets
    return json.loads(found[0].proto.spec), pl.from_arrow(pa.ipc.open_stream(dataset.data.data).read_all())


def report(data_dir: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(data_dir / "reports" / f"{name}.parquet")


def months(data_dir: Path) -> list[str]:
    """Every month with traffic (tenant_costs rows), newest first."""
    costs = report(data_dir, "tenant_costs")
    return sorted(set(costs["day"].dt.strftime("%Y-%m").to_list()), reverse=True)


def periods(data_dir: Path) -> list[str]:
    """Every month any report covers, newest first: what the period filter must offer. Statements run up
    to the current month, so on the 1st of a month the newest period has no traffic yet."""
    found = set(months(data_dir)) | set(report(data_dir, "statements")["period"])
    found |= set(report(data_dir, "user_costs")["month"])
    found |= set(report(data_dir, "denials")["day"].dt.strftime("%Y-%m"))
    return sorted(found, reverse=True)


def history_this_month() -> bool:
    """History ends yesterday (UTC): the current month has traffic unless today is the 1st."""
    return datetime.now(UTC).day > 1


def in_month(frame: pl.DataFrame, period: str) -> pl.DataFrame:
    return frame.filter(pl.col("day").dt.strftime("%Y-%m") == period)


def dsum(frame: pl.DataFrame, column: str = "cost_usd") -> Decimal:
    """Exact sum of the known amounts of a Decimal column."""
    return sum(frame[column].drop_nulls().to_list(), Decimal(0))


def as_shown(frame: pl.DataFrame) -> pl.DataFrame:
    """A report frame as a table shows it: money (`*_usd`) as `money` text (its rule is checked on
    hand-written amounts in test_dashboard_figures.py), missing text as an em dash."""
    return frame.with_columns(*(pl.Series(c, [money(v) for v in frame[c]], dtype=pl.String)
                                for c in frame.columns if c.endswith("_usd")),
                              pl.col(pl.String).fill_null("—"))


def csv_rules(path: Path, kind: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the `kind` (p or g) lines of a Casbin-style CSV policy file."""
    rules = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = [f.strip() for f in line.split(",")]
        if line.strip() and not line.lstrip().startswith("#") and fields[0] == kind:
            rules.append((number, fields[1:]))
    return rules


def limit_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of the data lines of policy/limits.csv (after its header)."""
    lines = [(n, [f.strip() for f in line.split(",")]) for n, line in enumerate(path.read_text().splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    assert lines[0][1] == ["tenant", "subject", "metric", "window", "limit"]
    return lines[1:]


def copy_of(history: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(history, target)
    return target


def init_deployment(path: Path) -> Path:
    assert cli_main(["init", str(path)]) == 0
    return path


PSEUDONYMS = Pseudonymizer(b"k" * 32)


def usage_event(ts: datetime, tenant: str, model: str, cost: str | None, *, user: str = "u@example.com",
                outcome: str = "ok", mode: str | None = "unified") -> Event:
    """One event as the gateway records it: usage reported; `cost` None means the model has no price.
    A refusal has no key; an admitted call that failed (`upstream_error`: a 404 for a misspelt model)
    has its key, but no usage."""
    provider = model.split("/", 1)[0]
    ok, admitted = outcome == "ok", outcome in ADMITTED
    return Event(uuid.uuid4(), ts, tenant, PSEUDONYMS(tenant, user), "token", provider, model, "chat/completions",
                 streamed=False, status_code={"ok": 200, "upstream_error": 404}.get(outcome, 403), outcome=outcome,
                 key_id=f"operator-{provider}" if admitted else None, billing_mode=mode if admitted else None,
                 input_tokens=1000 if ok else None, output_tokens=200 if ok else None,
                 cached_input_tokens=0 if ok else None, usage_source="reported" if ok else "none",
                 cost_usd=Decimal(cost) if cost is not None else None, latency_ms=250.0, attempts=1 if ok else 0)


def record_and_build(data_dir: Path, events: list[Event]) -> dict:
    """Append events to the deployment's events.duckdb and build its reports with the real job."""
    con = duckdb.connect(str(data_dir / "events.duckdb"))
    try:
        con.execute(CREATE_TABLE)
        if events:
            con.executemany(f"INSERT INTO events VALUES ({', '.join('?' * len(COLUMNS))})", [e.row() for e in events])
        return build_reports(con, data_dir / "reports", load_billing_inputs(data_dir))
    finally:
        con.close()


def this_month_at(day: int, hour: int = 12) -> datetime:
    return datetime.now(UTC).replace(day=day, hour=hour, minute=0, second=0, microsecond=0)


def subcent_single_day(data_dir: Path) -> Path:
    """A new deployment's first day: sub-cent spend today (UTC) only, after two days at the end of the
    previous month (so that month is only partly covered); a refused model, a misspelt one the provider
    rejected, a rate-limited call, and a user (bob) whose only call was refused."""
    init_deployment(data_dir)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=1, microsecond=0)
    first = today.replace(day=1)
    record_and_build(data_dir, [
        usage_event(first - timedelta(days=2), "acme", "openai/gpt-4o-mini", "0.0004", user="alice@acme.com"),
        usage_event(first - timedelta(days=1), "acme", "openai/gpt-4o-mini", "0.0005", user="alice@acme.com"),
        usage_event(today, "acme", "openai/gpt-4o-mini", "0.0001", user="alice@acme.com"),
        usage_event(today, "acme", "openai/gpt-4o-mini", "0.0001", user="alice@acme.com"),
        usage_event(today, "acme", "openai/gpt-4o-mini", None, user="alice@acme.com", outcome="rate_limited"),
        usage_event(today, "acme", "anthropic/claude-opus-4-1", None, user="bob@acme.com", outcome="denied"),
        usage_event(today, "globex", "openai/gpt-4.1", "0.00012345", user="carol@globex.com"),
        usage_event(today, "globex", "openai/gpt-4o-mnii", None, user="carol@globex.com", outcome="upstream_error"),
    ])
    return data_dir


@pytest.fixture(scope="module")
def subcent(tmp_path_factory) -> Path:
    return subcent_single_day(tmp_path_factory.mktemp("subcent") / "data")


# --- Overview ----------------------------------------------------------------------------------------
def test_overview_headline_is_the_newest_months_tenant_costs(history, monkeypatch):
    at = open_app(monkeypatch, history)
    assert at.selectbox(key="period").options == periods(history)
    assert at.selectbox(key="period").value == periods(history)[0]  # the newest is picked first
    newest = months(history)[0]
    choose(at, "period", newest)  # a no-op but on the 1st of a month
    rows = in_month(report(history, "tenant_costs"), newest)
    assert texts(at, "title") == ["Overview"]
    assert at.selectbox(key="tenant").value == "All tenants"
    assert metric(at, "Spend") == money(dsum(rows))
    assert metric(at, "Requests") == f"{rows['requests'].sum():,}"
    assert metric(at, "Unpriced requests") == f"{rows['unpriced_requests'].sum():,}"
    assert not any("no price" in w for w in texts(at, "warning"))  # every history model is priced
    spend_table = table(at, "tenant", "cost_usd")
    expected = rows.group_by("tenant").agg(pl.col("cost_usd").sum(), pl.col("requests").sum()).sort("tenant")
    assert_frame_equal(spend_table.select("tenant", "cost_usd", "requests").sort("tenant"), as_shown(expected),
                       check_dtypes=False)


def test_overview_follows_the_tenant_and_period_filters(history, monkeypatch):
    newest, previous = months(history)[:2]
    at = open_app(monkeypatch, history, period=newest)
    costs = report(history, "tenant_costs")
    everyone = metric(at, "Spend")

    choose(at, "tenant", "acme")
    acme = in_month(costs, newest).filter(pl.col("tenant") == "acme")
    assert metric(at, "Spend") == money(dsum(acme))
    assert metric(at, "Spend") != everyone
    assert metric(at, "Requests") == f"{acme['requests'].sum():,}"

    choose(at, "tenant", "All tenants")
    choose(at, "period", previous)
    before = in_month(costs, previous)
    assert metric(at, "Spend") == money(dsum(before))
    assert metric(at, "Requests") == f"{before['requests'].sum():,}"
    assert texts(at, "caption")[0] == f"all tenants · {previous}"


def test_overview_counts_and_warns_about_unpriced_requests(tmp_path, monkeypatch):
    data = init_deployment(tmp_path / "data")
    day = this_month_at(1)
    record_and_build(data, [
        usage_event(day, "acme", "openai/gpt-4o-mini", "0.50"),
        usage_event(day, "acme", "openai/gpt-4o-mini", "0.25"),
        usage_event(day, "globex", "openai/gpt-4.1", "2.00"),
        usage_event(day, "acme", "openai/gpt-unlisted", None),  # a model pricing.csv does not know
        usage_event(day, "acme", "openai/gpt-unlisted", None),
    ])
    rows = in_month(report(data, "tenant_costs"), day.strftime("%Y-%m"))
    unpriced = rows["unpriced_requests"].sum()
    assert unpriced == 2  # the report itself counts them

    at = open_app(monkeypatch, data)
    assert metric(at, "Unpriced requests") == f"{unpriced:,}"
    assert metric(at, "Spend") == money(dsum(rows))  # the known costs only, never a made-up zero for the rest
    assert metric(at, "Requests") == f"{rows['requests'].sum():,}"
    warnings = [w for w in texts(at, "warning") if "no price" in w]
    assert len(warnings) == 1 and f"{unpriced} request(s)" in warnings[0] and "pricing.csv" in warnings[0]

    choose(at, "tenant", "globex")  # globex used priced models only
    assert metric(at, "Unpriced requests") == "0"
    assert not any("no price" in w for w in texts(at, "warning"))
    assert not [d for d in at.dataframe if "last_seen" in d.value.columns]  # no unpriced-models table



def test_overview_lists_the_unpriced_models_to_price(tmp_path, monkeypatch):
    data = init_deployment(tmp_path / "data")
    first, second = this_month_at(1, hour=0), this_month_at(1, hour=1)
    record_and_build(data, [
        usage_event(first, "acme", "openai/gpt-4o-mini", "0.50"),
        usage_event(first, "acme", "openai/gpt-unpriced-test", None),  # models pricing.csv does not know
        usage_event(second, "globex", "openai/gpt-unpriced-test", None),
        usage_event(second, "globex", "openai/gpt-unpriced-test", None),
        usage_event(second, "globex", "anthropic/claude-unpriced-test", None),
    ])
    at = open_app(monkeypatch, data)
    shown = table(at, "model", "unpriced_requests", "tenants", "last_seen", exact=True)
    assert shown.select("model", "unpriced_requests", "tenants").rows() == [
        ("openai/gpt-unpriced-test", 3, "acme, globex"), ("anthropic/claude-unpriced-test", 1, "globex")]
    assert shown["last_seen"].dt.date().to_list() == [first.date()] * 2
    assert any("pricing.csv" in c and "tollway pricing check" in c for c in texts(at, "caption"))

    choose(at, "tenant", "acme")
    assert table(at, "model", "tenants").select("model", "unpriced_requests").rows() == [
        ("openai/gpt-unpriced-test", 1)]

def all_unpriced_globex(data_dir: Path) -> Path:
    """acme with priced usage; globex whose every request used a model pricing.csv does not know."""
    init_deployment(data_dir)
    day = this_month_at(1)
    record_and_build(data_dir, [usage_event(day, "acme", "openai/gpt-4o-mini", "0.50"),
                                usage_event(day, "globex", "openai/gpt-unlisted", None),
                                usage_event(day, "globex", "openai/gpt-unlisted", None)])
    assert report(data_dir, "tenant_costs").filter(pl.col("tenant") == "globex")["cost_usd"].to_list() == [None]
    return data_dir


def test_overview_spend_of_an_all_unpriced_tenant_is_unknown_not_zero(tmp_path, monkeypatch):
    data = all_unpriced_globex(tmp_path / "data")
    at = open_app(monkeypatch, data)
    choose(at, "tenant", "globex")
    assert metric(at, "Spend") == money(None) == "—"
    assert metric(at, "Unpriced requests") == "2"


def test_spend_tables_do_not_show_zero_for_an_all_unpriced_tenant(tmp_path, monkeypatch):
    data = all_unpriced_globex(tmp_path / "data")
    at = open_app(monkeypatch, data)
    overview = table(at, "tenant", "cost_usd").filter(pl.col("tenant") == "globex")
    assert overview["unpriced_requests"].to_list() == [2]
    assert overview["cost_usd"].to_list() == ["—"], "Overview shows a made-up $0.00"
    goto(at, "tenants")
    tenants = table(at, "tenant", "total_usd").filter(pl.col("tenant") == "globex")
    assert tenants["total_usd"].to_list() == ["—"], "Tenants shows a made-up $0.00"


# --- Tenants -----------------------------------------------------------------------------------------
def test_tenants_table_totals_match_tenant_costs(history, monkeypatch):
    at = open_app(monkeypatch, history, "tenants", period=months(history)[0])
    assert texts(at, "title") == ["Tenants"]
    rows = in_month(report(history, "tenant_costs"), months(history)[0])
    expected = (rows.group_by("tenant")
                .agg(requests=pl.col("requests").sum(),
                     unified_usd=pl.col("cost_usd").filter(pl.col("billing_mode") == "unified").sum(),
                     byok_usd=pl.col("cost_usd").filter(pl.col("billing_mode") == "byok").sum(),
                     total_usd=pl.col("cost_usd").sum())
                .sort("tenant"))
    shown = table(at, "tenant", "total_usd").sort("tenant")
    assert shown["tenant"].to_list() == ["acme", "globex"]
    assert_frame_equal(shown.select(expected.columns), as_shown(expected), check_dtypes=False)
    # largest spender first
    largest_first = expected.sort("total_usd", descending=True)["tenant"].to_list()
    assert table(at, "tenant", "total_usd")["tenant"].to_list() == largest_first


def test_tenant_page_shows_terms_routes_and_budget(history, monkeypatch):
    at = open_app(monkeypatch, history, "tenants")
    choose(at, "tenant", "acme")
    terms = pl.read_csv(history / "tenants.csv", infer_schema=False).filter(pl.col("tenant") == "acme").row(
        0, named=True)
    assert any(f"**{terms['name']}**" in m and f"**{terms['markup_pct']}%**" in m
               and f"**{terms['byok_fee_pct']}%**" in m for m in texts(at, "markdown"))

    routes = table(at, "keys", "applies_to")
    expected = [(line, f[1], " → ".join(f[2].split("|"))) for line, f in csv_rules(history / "policy/routes.csv", "p")
                if f[0] in ("acme", "*")]
    assert list(zip(routes["line"], routes["models"], routes["keys"], strict=True)) == expected
    anthropic = routes.filter(pl.col("models") == "anthropic/*").row(0, named=True)  # the first match wins
    assert anthropic["keys"] == "acme-anthropic"
    assert anthropic["billing_mode"] == "byok" and anthropic["applies_to"] == "this tenant"
    openai = routes.filter(pl.col("models") == "openai/*").row(0, named=True)
    assert openai["billing_mode"] == "unified" and openai["applies_to"] == "every tenant (*)"

    budgets = table(at, "limit_usd", "spent_usd")
    assert set(budgets["tenant"]) == {"acme"}
    monthly = budgets.filter((pl.col("window") == "month") & (pl.col("subject") == "tenant")).row(0, named=True)
    limit = next(Decimal(f[4]) for _, f in limit_rows(history / "policy/limits.csv")
                 if f[:4] == ["acme", "tenant", "usd", "month"])
    assert monthly["limit_usd"] == money(limit)
    assert monthly["user_pseudonym"] == "—"  # a tenant-wide budget has no user: no "None" cell
    status = report(history, "budget_status").filter((pl.col("tenant") == "acme") & (pl.col("window") == "month")
                                                     & (pl.col("subject") == "tenant"))
    assert monthly["spent_usd"] == money(status["spent_usd"][0])
    assert status["spent_usd"][0] > 0 or not history_this_month()


def test_tenant_without_history_gets_no_routes_of_another_tenant(history, monkeypatch):
    at = open_app(monkeypatch, history, "tenants")
    choose(at, "tenant", "globex")
    routes = table(at, "keys", "applies_to")
    assert "acme-anthropic" not in " ".join(routes["keys"])
    assert set(routes["applies_to"]) == {"every tenant (*)"}
    assert any("**Globex Inc**" in m for m in texts(at, "markdown"))


# --- Billing -----------------------------------------------------------------------------------------
def test_billing_statements_table_matches_statements_parquet(history, monkeypatch):
    at = open_app(monkeypatch, history, "billing")
    assert texts(at, "title") == ["Billing"]
    newest = at.selectbox(key="period").value
    statements = report(history, "statements")
    shown = table(at, "unified_cost_usd")
    assert shown.columns == STATEMENT_COLUMNS
    assert_frame_equal(shown, as_shown(statements.filter(pl.col("period") == newest)), check_dtypes=False)

    choose(at, "tenant", "globex")
    assert_frame_equal(table(at, "unified_cost_usd"),
                       as_shown(statements.filter((pl.col("period") == newest) & (pl.col("tenant") == "globex"))),
                       check_dtypes=False)
    due = statements.filter((pl.col("period") == newest) & (pl.col("tenant") == "globex"))
    assert metric(at, "Amount due") == money(dsum(due, "amount_due_usd"))
    assert metric(at, "Charges") == money(dsum(due, "charges_usd"))


def test_billing_download_is_the_statements_csv(history, monkeypatch, downloads):
    at = open_app(monkeypatch, history, "billing")
    newest = at.selectbox(key="period").value

    def downloaded() -> tuple[str, bytes]:
        [button] = at.get("download_button")
        media = downloads[-1].get_file(button.proto.url.rsplit("/", 1)[-1])
        return media.filename, media.content

    name, body = downloaded()
    assert name == f"statements-{newest}-all-tenants.csv"
    assert body == write_csv(report(history, "statements").filter(pl.col("period") == newest)).encode()

    at.toggle[0].set_value(True).run()  # "Every period", all tenants: the report's own CSV twin, byte for byte
    assert not at.exception
    name, body = downloaded()
    assert name == "statements-all-all-tenants.csv"
    assert body == (history / "reports" / "statements.csv").read_bytes()
    assert_frame_equal(table(at, "unified_cost_usd"), as_shown(report(history, "statements")), check_dtypes=False)


def test_billing_download_neutralises_formula_tenants_like_the_report_csv(tmp_path, monkeypatch, downloads):
    """Tenant ids a spreadsheet would run (OWASP CSV injection): quoted in the download, byte for byte as in
    reports/statements.csv, while the Parquet report and the page keep the exact ids."""
    data = init_deployment(tmp_path / "data")
    hostile = ["=cmd|' /C calc'!A0", "+1", "-x", "@SUM(1)", "\tx"]
    record_and_build(data, [usage_event(this_month_at(1), tenant, "openai/gpt-4o-mini", "0.50") for tenant in hostile])
    assert sorted(report(data, "statements")["tenant"]) == sorted(hostile)

    at = open_app(monkeypatch, data, "billing")
    at.toggle[0].set_value(True).run()  # every period, all tenants: the whole report
    assert not at.exception
    [button] = at.get("download_button")
    body = downloads[-1].get_file(button.proto.url.rsplit("/", 1)[-1]).content
    assert body == (data / "reports" / "statements.csv").read_bytes()
    assert sorted(pl.read_csv(body, infer_schema=False)["tenant"]) == sorted(f"'{t}" for t in hostile)
    assert sorted(table(at, "unified_cost_usd")["tenant"]) == sorted(hostile)  # shown as they are


def test_billing_credit_balance_reflects_the_top_up(history, monkeypatch):
    at = open_app(monkeypatch, history, "billing")
    choose(at, "tenant", "globex")
    globex = report(history, "statements").filter(pl.col("tenant") == "globex").sort("period")
    assert dsum(globex, "credits_added_usd") == Decimal("50")
    applied = dsum(globex, "credits_applied_usd")
    assert applied > 0 or not history_this_month()  # globex's unified usage this month used some of it
    balances = table(at, "tenant", "period", "credits_closing_usd", "amount_due_usd", exact=True)
    assert balances.rows() == [("globex", globex["period"][-1], money(Decimal("50") - applied),
                                money(globex["amount_due_usd"][-1]))]
    assert any(e.label == "Top-ups (1)" for e in at.expander)
    ledger = table(at, "amount_usd", "note")
    assert ledger.select("tenant", "amount_usd", "note").rows() == [("globex", "$50.00", "prepaid")]


# --- Users -------------------------------------------------------------------------------------------
def _rendered(node) -> list[str]:
    """Every piece of text the element tree holds (widget labels, markdown, tables, chart specs)."""
    found = []
    proto = getattr(node, "proto", None)
    if proto is not None and hasattr(proto, "SerializeToString"):
        found.append(proto.SerializeToString().decode("latin-1"))
    if getattr(node, "type", None) == "dataframe":
        found.append(node.value.to_csv())
    for child in getattr(node, "children", {}).values():
        found += _rendered(child)
    return found


USER_IDS = {user for _, users, _, _ in HISTORY_WORKLOADS for user, _ in users}


def user_ids_shown(at: AppTest) -> set[str]:
    """The user ids (emails, or their local parts as words) anywhere on the rendered page."""
    everything = "\n".join(_rendered(at._tree))
    return {needle for user in USER_IDS for needle in (user, user.split("@")[0])
            if re.search(rf"\b{re.escape(needle)}\b", everything, re.IGNORECASE)}


def test_users_page_shows_pseudonyms_only_sorted_by_spend(history, monkeypatch):
    newest = months(history)[0]
    at = open_app(monkeypatch, history, "users", period=newest)
    assert texts(at, "title") == ["Top spenders"]
    assert any("pseudonyms" in i and "HMAC" in i for i in texts(at, "info"))
    users = report(history, "user_costs").filter(pl.col("month") == newest)

    top = table(at, "user_pseudonym", "cost_usd")
    assert top.height == users.height
    by_user = dict(zip(users["user_pseudonym"], users["cost_usd"], strict=True))
    assert [by_user[p] for p in top["user_pseudonym"]] == sorted(users["cost_usd"], reverse=True)  # largest first
    assert sorted(top["user_pseudonym"]) == sorted(users["user_pseudonym"])
    assert all(str(uuid.UUID(p)) == p for p in top["user_pseudonym"])
    assert all(cost == money(by_user[p]) for p, cost in top.select("user_pseudonym", "cost_usd").rows())

    assert top["user_pseudonym"][0] in "\n".join(_rendered(at._tree))  # the walk does reach the table
    assert user_ids_shown(at) == set()
    chart = "\n".join(c.proto.SerializeToString().decode("latin-1") for c in at.get("vega_lite_chart"))
    assert top["user_pseudonym"][0][:8] in chart  # the chart labels users by pseudonym prefix

    choose(at, "tenant", "acme")
    assert set(table(at, "user_pseudonym", "cost_usd")["tenant"]) == {"acme"}
    assert user_ids_shown(at) == set()
    goto(at, "policy")  # the same walk does see a user id where one is meant to be shown (a g line)
    assert {"alice@acme.com", "alice"} <= user_ids_shown(at)


# --- Policy ------------------------------------------------------------------------------------------
def test_policy_page_shows_the_files_and_their_status(history, monkeypatch):
    at = open_app(monkeypatch, history, "policy")
    assert texts(at, "title") == ["Policy"]
    assert any(s.startswith("The policy files are valid") for s in texts(at, "success"))
    assert not texts(at, "error")
    policy = history / "policy"

    access = table(at, "subject", "effect")
    assert [(line, [s, t, m, e]) for line, s, t, m, e in access.select("line", "subject", "tenant", "models",
                                                                       "effect").rows()] \
        == csv_rules(policy / "access.csv", "p")
    roles = table(at, "user", "role")
    assert [(line, [u, r, t]) for line, u, r, t in roles.select("line", "user", "role", "tenant").rows()] \
        == csv_rules(policy / "access.csv", "g")
    routes = table(at, "keys", "models")
    assert [(line, [t, m, k.replace(" → ", "|")]) for line, t, m, k in routes.select("line", "tenant", "models",
                                                                                     "keys").rows()] \
        == csv_rules(policy / "routes.csv", "p")
    limits = table(at, "metric", "window")
    assert [(line, [t, s, m, w, lim]) for line, t, s, m, w, lim in limits.select(
        "line", "tenant", "subject", "metric", "window", "limit").rows()] == limit_rows(policy / "limits.csv")


def test_policy_denials_match_the_denials_report(history, monkeypatch):
    newest = months(history)[0]
    at = open_app(monkeypatch, history, "policy", period=newest)
    denied = in_month(report(history, "denials"), newest).with_columns(pl.col("tenant").fill_null("none"))
    assert denied["count"].sum() > 0  # bob's Claude calls are denied every day
    expected = denied.group_by("tenant", "model", "outcome").agg(pl.col("count").sum())
    shown = table(at, "outcome", "count")
    assert sorted(shown.select("tenant", "model", "outcome", "count").rows()) == sorted(expected.rows())
    assert shown["count"].to_list() == sorted(shown["count"].to_list(), reverse=True)

    choose(at, "tenant", "globex")
    shown = table(at, "outcome", "count")
    assert sorted(shown.select("tenant", "model", "outcome", "count").rows()) \
        == sorted(expected.filter(pl.col("tenant") == "globex").rows())


def test_policy_page_shows_an_invalid_edit_and_the_last_refused_one(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    at = open_app(monkeypatch, data, "policy")
    assert any(s.startswith("The policy files are valid") for s in texts(at, "success"))

    access = data / "policy" / "access.csv"
    access.write_text(access.read_text() + "p, role:engineering, acme, openai/*, perhaps\n")
    bad_line = len(access.read_text().splitlines())
    at.run()  # the same session: the edit must show without a restart or a cache clear
    assert not at.exception
    assert not texts(at, "success")
    assert any("1 error(s)" in e for e in texts(at, "error"))
    assert any(f"policy/access.csv:{bad_line}: error:" in c for c in texts(at, "code"))

    store = ControlStore(data / "control.db", Keyring(load_master_key(data)))
    try:
        store.audit("policy.refused", "v1", {"errors": ["policy/access.csv:9: error: x"], "files": {}})
    finally:
        store.close()
    at.run()
    assert not at.exception
    refused = [m for m in texts(at, "markdown") if m.startswith("**Last refused edit:**")]
    assert len(refused) == 1 and "still runs the version before it" in refused[0]
    assert "policy/access.csv:9: error: x" in texts(at, "code")


# --- sub-cent amounts, one day of data, a partly covered previous month ---------------------------------
def test_subcent_overview_reads_the_same_in_cards_table_and_chart(subcent, monkeypatch):
    at = open_app(monkeypatch, subcent)
    assert metric(at, "Spend") == "$0.0003235"  # 0.0001 + 0.0001 + 0.00012345, four significant digits
    assert metric(at, "Spend today (UTC)") == "$0.0003235"
    assert metric(at, "Requests") == "6"
    assert metric(at, "Error rate") == "16.7%"  # 1 of 6: the misspelt model's 404
    assert metric(at, "Refusal rate") == "33.3%"  # the denied model and the rate-limited call
    assert headers(at) == [["Tenant", "Requests", "Errors", "Refusals", "Input tokens", "Output tokens", "Cost (USD)",
                            "Unpriced requests"]]
    assert table(at, "tenant", "cost_usd").rows() == [("acme", 4, 0, 2, 2000, 400, "$0.0002", 0),
                                                      ("globex", 2, 1, 0, 1000, 200, "$0.0001235", 0)]
    spec, daily = chart(at, "Daily spend by tenant")
    assert spec["encoding"]["y"]["axis"]["format"] == "$,.5f"  # ticks 0.00005 apart, not all "$0.00"
    today = datetime.now(UTC).date().isoformat()
    assert spec["encoding"]["x"]["scale"]["domain"] == [today]  # one day of data: one band, one label
    assert daily.select("tenant", "spend").sort("tenant").rows() == [("acme", "$0.0002"), ("globex", "$0.0001235")]


def test_a_partly_covered_previous_month_gets_no_percentage(subcent, monkeypatch):
    """History from the previous month's last two days: no "+324 %" against two days of spend."""
    at = open_app(monkeypatch, subcent)
    [spend] = [m for m in at.metric if m.label == "Spend"]
    assert not spend.delta
    first = datetime.now(UTC).date().replace(day=1)
    before, start = (first - timedelta(days=1)).strftime("%Y-%m"), first - timedelta(days=2)
    assert (f"No spend change shown: the previous period ({before}) is only partly covered "
            f"(the history starts {start}).") in texts(at, "caption")


def test_a_fully_covered_previous_month_is_compared_over_the_same_days(tmp_path, monkeypatch):
    data = init_deployment(tmp_path / "data")
    today = datetime.now(UTC).replace(hour=0, minute=0, second=1, microsecond=0)
    first_before = (today.replace(day=1) - timedelta(days=1)).replace(day=1)
    record_and_build(data, [usage_event(first_before, "acme", "openai/gpt-4o-mini", "0.0010"),
                            usage_event(today, "acme", "openai/gpt-4o-mini", "0.0005")])
    at = open_app(monkeypatch, data)
    [spend] = [m for m in at.metric if m.label == "Spend"]
    assert (spend.value, spend.delta) == ("$0.0005", "-50.0%")
    assert (f"Spend change is against the same {today.day} days of {first_before:%Y-%m} ($0.0010)."
            in texts(at, "caption"))


def test_subcent_tenants_page_keeps_refused_and_misspelt_models_out_of_spend_charts(subcent, monkeypatch):
    at = open_app(monkeypatch, subcent, "tenants")
    assert table(at, "tenant", "total_usd").rows() == [("acme", 4, "$0.0002", "$0.00", "$0.0002"),
                                                       ("globex", 2, "$0.0001235", "$0.00", "$0.0001235")]
    _, by_model = chart(at, "Daily spend by model")  # not the denied anthropic/claude-opus-4-1, nor the 404
    assert by_model.select("model", "spend").rows() == [("openai/gpt-4.1", "$0.0001235"),  # openai/gpt-4o-mnii
                                                        ("openai/gpt-4o-mini", "$0.0002")]
    _, by_mode = chart(at, "Daily spend by billing mode")
    assert by_mode["billing_mode"].to_list() == ["unified"]  # refusals have no billing mode: no "unknown"
    budgets = table(at, "limit_usd", "spent_usd")
    assert budgets.select("tenant", "window", "subject", "user_pseudonym", "spent_usd", "limit_usd").rows() == [
        ("acme", "month", "tenant", "—", "$0.0002", "$5,000.00")]
    assert headers(at)[1] == ["Tenant", "Window", "Subject", "User (pseudonym)", "Spent (USD)", "Limit (USD)", "Used",
                              "Forecast (USD)", "Forecast over limit"]


def test_subcent_users_billing_and_policy_pages(subcent, monkeypatch):
    at = open_app(monkeypatch, subcent, "users")
    users = table(at, "user_pseudonym", "cost_usd")
    assert users.select("tenant", "requests", "cost_usd").rows() == [
        ("acme", 3, "$0.0002"), ("globex", 2, "$0.0001235"), ("acme", 1, "$0.00")]  # bob: refused, used nothing
    spec, bars = chart(at, "Spend per user (first 8 characters of the pseudonym)")
    assert spec["encoding"]["x"]["axis"]["format"] == "$,.5f"
    assert bars["spend"].to_list() == ["$0.0002", "$0.0001235", "$0.00"]

    goto(at, "billing")
    assert headers(at)[0] == ["Period", "Tenant", "Unified cost (USD)", "Markup (USD)", "BYOK cost (USD)",
                              "BYOK fee (USD)", "Charges (USD)", "Credits at opening (USD)", "Credits added (USD)",
                              "Credits applied (USD)", "Credits at closing (USD)", "Amount due (USD)",
                              "Unpriced requests", "Adjustments (USD)", "Closed"]
    statements = table(at, "unified_cost_usd")
    assert set(statements["unified_cost_usd"]) == {"$0.00"}  # statements are in cents: the billing job rounds

    goto(at, "policy")
    assert table(at, "outcome", "count", exact=False).select("tenant", "model", "outcome", "count").rows() == [
        ("acme", "anthropic/claude-opus-4-1", "denied", 1), ("acme", "openai/gpt-4o-mini", "rate_limited", 1)]
    assert headers(at)[-1] == ["Tenant", "Model", "Outcome", "Refused requests"]


@pytest.mark.parametrize("deployment", ["subcent", "history"])
def test_every_table_has_human_headers_and_no_none_cells(deployment, request, monkeypatch):
    at = open_app(monkeypatch, request.getfixturevalue(deployment))
    for tenant in ("All tenants", "acme"):
        choose(at, "tenant", tenant)
        for page in PAGES:
            goto(at, page)
            assert at.dataframe, page
            shown = [h for hs in headers(at) for h in hs]
            assert all("_" not in h and h[0].isupper() for h in shown), (page, shown)
            assert not {"None", "nan", "NaN", "<NA>", "NaT"} & cells(at), (page, tenant)
            assert {df.proto.placeholder for df in at.dataframe} == {"—"}  # a missing number is drawn as —


# --- missing, empty, stale, damaged -------------------------------------------------------------------
def test_every_page_explains_reports_that_were_never_built(tmp_path, monkeypatch):
    data = init_deployment(tmp_path / "data")
    at = open_app(monkeypatch, data)
    for page in PAGES:
        goto(at, page)
        assert any("tollway report run" in i for i in texts(at, "info")), (page, texts(at, "info"))
        if page != "policy":  # the policy tables come from the files, not from reports
            assert not at.metric and not at.dataframe, page
    goto(at, "overview")
    assert any("No reports yet" in i and f"--data-dir {data}" in i for i in texts(at, "info"))


def test_reports_built_from_no_events_say_no_traffic_yet(tmp_path, monkeypatch):
    data = init_deployment(tmp_path / "data")
    manifest = record_and_build(data, [])
    assert manifest["source_rows"] == 0
    at = open_app(monkeypatch, data)
    for page in REPORT_PAGES:
        goto(at, page)
        assert any("No traffic recorded yet" in i for i in texts(at, "info")), (page, texts(at, "info"))
        assert not texts(at, "warning") and not texts(at, "error"), page
    goto(at, "policy")  # no denials to draw, and no crash either
    assert any("No request was refused" in i for i in texts(at, "info"))


def backdate_manifest(data: Path, days: int) -> tuple[Path, dict]:
    """Make the reports look built `days` ago; returns the manifest's path and its new content."""
    manifest_path = data / "reports" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["built_at"] = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path, manifest


def test_stale_reports_are_flagged_but_still_shown(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    manifest_path, manifest = backdate_manifest(data, days=2)
    at = open_app(monkeypatch, data, period=months(data)[0])
    for page in REPORT_PAGES:
        goto(at, page)
        stale = [w for w in texts(at, "warning") if "stale" in w]
        assert len(stale) == 1, (page, texts(at, "warning"))
        assert "2 days" in stale[0] and "tollway report run" in stale[0]
    assert any(c.startswith("Reports built 2 days ago") for c in texts(at, "caption"))
    goto(at, "overview")
    assert metric(at, "Spend") == money(dsum(in_month(report(data, "tenant_costs"), months(data)[0])))

    manifest["built_at"] = datetime.now(UTC).isoformat()  # rebuilt: the warning goes on the next run
    manifest_path.write_text(json.dumps(manifest))
    at.run()
    assert not at.exception
    assert not any("stale" in w for w in texts(at, "warning"))
    assert metric(at, "Spend") == money(dsum(in_month(report(data, "tenant_costs"), months(data)[0])))


def test_policy_page_flags_stale_denials(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    backdate_manifest(data, days=2)
    at = open_app(monkeypatch, data, "policy", period=months(data)[0])
    assert table(at, "outcome", "count").height > 0  # the denials are drawn …
    assert any("stale" in w for w in texts(at, "warning"))  # … and should be flagged as stale


def test_a_damaged_report_is_named_and_other_pages_still_work(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    (data / "reports" / "tenant_costs.parquet").write_bytes(b"this is not parquet" * 10)
    at = open_app(monkeypatch, data, period=months(history)[0])
    for page in ("overview", "tenants"):
        goto(at, page)
        damaged = [e for e in texts(at, "error") if "`tenant_costs`" in e]
        assert len(damaged) == 1 and "could not be read" in damaged[0] and "tollway report run" in damaged[0], page
        assert not at.metric and not at.dataframe, page
    goto(at, "billing")
    assert not texts(at, "error")
    assert table(at, "unified_cost_usd").height > 0
    goto(at, "users")
    assert not texts(at, "error")
    assert table(at, "user_pseudonym", "cost_usd").height > 0
    goto(at, "policy")
    assert table(at, "outcome", "count").height > 0


def test_a_damaged_report_is_not_called_missing(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    (data / "reports" / "tenant_costs.parquet").write_bytes(b"this is not parquet" * 10)
    at = open_app(monkeypatch, data)
    assert any("`tenant_costs`" in e for e in texts(at, "error"))
    assert not any("missing" in w for w in texts(at, "warning")), texts(at, "warning")


def test_policy_page_names_a_damaged_denials_report(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    (data / "reports" / "denials.parquet").write_bytes(b"this is not parquet" * 10)
    at = open_app(monkeypatch, data, "policy")
    assert not any("No denials report yet" in i for i in texts(at, "info")), texts(at, "info")
    assert any("`denials`" in e and "could not be read" in e for e in texts(at, "error"))


def test_a_missing_report_is_named(history, tmp_path, monkeypatch):
    data = copy_of(history, tmp_path)
    (data / "reports" / "tenant_costs.parquet").unlink()
    at = open_app(monkeypatch, data)
    for page in ("overview", "tenants"):
        goto(at, page)
        missing = [w for w in texts(at, "warning") if "`tenant_costs`" in w]
        assert len(missing) == 1 and "missing" in missing[0] and "tollway report run" in missing[0], page
        assert not texts(at, "error") and not at.metric, page
    goto(at, "billing")
    assert table(at, "unified_cost_usd").height > 0


# --- cache invalidation -------------------------------------------------------------------------------
def test_a_new_report_build_shows_on_the_next_run(tmp_path, monkeypatch):
    data = init_deployment(tmp_path / "data")
    day = this_month_at(1)
    record_and_build(data, [usage_event(day, "acme", "openai/gpt-4o-mini", "1.25")])
    at = open_app(monkeypatch, data)
    first = in_month(report(data, "tenant_costs"), day.strftime("%Y-%m"))
    assert metric(at, "Spend") == money(dsum(first))
    assert at.selectbox(key="tenant").options == ["All tenants", "acme", "globex"]

    record_and_build(data, [usage_event(day, "globex", "openai/gpt-4.1", "3.50"),
                            usage_event(day, "newco", "openai/gpt-4.1", "0.75")])
    after = in_month(report(data, "tenant_costs"), day.strftime("%Y-%m"))
    assert dsum(after) != dsum(first)
    at.run()  # same session, caches untouched
    assert not at.exception
    assert metric(at, "Spend") == money(dsum(after))
    assert metric(at, "Requests") == f"{after['requests'].sum():,}"
    assert "newco" in at.selectbox(key="tenant").options


# --- a control store that cannot be reached ------------------------------------------------------------
def test_an_unreachable_postgresql_control_store_leaves_the_pages_up_with_a_warning(history, tmp_path, monkeypatch):
    pytest.importorskip("psycopg")
    copy = tmp_path / "data"
    shutil.copytree(history, copy)
    url = f"postgresql://tollway:hunter2-pw@127.0.0.1:{free_port()}/tollway"  # nothing listens there
    with (copy / "tollway.toml").open("a") as toml:
        toml.write(f'\n[control]\nurl = "{url}"\n')
    for page in (None, "tenants", "billing", "policy"):
        at = open_app(monkeypatch, copy, page)
        warnings = [w.value for w in at.warning]
        assert any("control store cannot be read" in w and "PostgreSQL" in w for w in warnings), warnings
        assert not any("hunter2-pw" in w for w in warnings), "the password is never shown"
