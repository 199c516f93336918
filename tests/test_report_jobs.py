"""Report jobs on a real DuckDB file: Parquet + CSV twins, the manifest, atomic writes, `tollway report run`."""

from __future__ import annotations

import io
import json
import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analytics.billing import Credit
from analytics.csv_safety import csv_safe
from analytics.jobs import (
    MANIFEST,
    REPORTS,
    BillingInputs,
    build_reports,
    code_version,
    load_events,
    write_atomically,
)
from policy.files import Tenant
from proxy.events import Event
from proxy.recorder import EventRecorder, open_events_db
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(90)

START = datetime(2025, 3, 1, 22, 0, tzinfo=UTC)
ALICE, BOB = uuid.UUID(int=1, version=4), uuid.UUID(int=2, version=4)


def sample_events() -> list[Event]:
    """Two days of acme and globex traffic: answers (one unpriced), an upstream failure and refusals."""
    events = []
    for i in range(40):
        ts = START + timedelta(minutes=7 * i)  # crosses UTC midnight
        tenant = ("acme", "globex")[i % 2]
        provider, model = (("openai", "openai/gpt-4o-mini"), ("anthropic", "anthropic/claude-sonnet-4"))[i % 3 == 0]
        kind = i % 10
        common = dict(event_id=uuid.UUID(int=i + 1, version=4), ts=ts, tenant=tenant,
                      user_pseudonym=(ALICE, BOB, None)[i % 3], auth_method="token", provider=provider, model=model,
                      endpoint="openai/chat.completions.create", attempts=1)
        if kind == 7:
            events.append(Event(**common, status_code=403, outcome="denied", latency_ms=1.5))
        elif kind == 8:
            events.append(Event(**common, status_code=502, outcome="upstream_error", billing_mode="unified",
                                latency_ms=250.0))
        else:
            events.append(Event(**common, status_code=200, outcome="ok", billing_mode="unified",
                                input_tokens=100 + i, output_tokens=10 + i, cached_input_tokens=i % 4,
                                usage_source="reported",
                                cost_usd=None if kind == 3 else Decimal(f"0.{i + 1:09d}"),
                                latency_ms=float(20 + (i * 37) % 200)))
    return events


def write_events(path: Path, events: list[Event]) -> None:
    con = open_events_db(path)
    recorder = EventRecorder(con, flush_interval_ms=50)
    for event in events:
        recorder.record(event)
    recorder.close()
    assert recorder.written == len(events) and recorder.last_error is None
    con.close()


def read_only(path: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(path), read_only=True)


@pytest.fixture
def events_db(tmp_path) -> Path:
    path = tmp_path / "events.duckdb"
    write_events(path, sample_events())
    return path


def build(events_db: Path, reports_dir: Path) -> dict:
    con = read_only(events_db)
    try:
        return build_reports(con, reports_dir)
    finally:
        con.close()


def pure_reports(events_db: Path) -> dict[str, pl.DataFrame]:
    con = read_only(events_db)
    try:
        events = load_events(con)
    finally:
        con.close()
    return {name: report(events.lazy()).collect() for name, report in REPORTS.items()}


def test_build_reports_writes_parquet_csv_and_manifest(events_db, tmp_path):
    reports_dir = tmp_path / "reports"
    before = datetime.now(UTC)
    manifest = build(events_db, reports_dir)
    after = datetime.now(UTC)

    expected_files = {MANIFEST} | {f"{name}{suffix}" for name in REPORTS for suffix in (".parquet", ".csv")}
    assert {p.name for p in reports_dir.iterdir()} == expected_files, "no temporary file may be left behind"

    pure = pure_reports(events_db)
    for name, want in pure.items():
        assert want.height > 0, name
        parquet = pl.read_parquet(reports_dir / f"{name}.parquet")
        assert_frame_equal(parquet, want, check_exact=True)
        csv_text = (reports_dir / f"{name}.csv").read_text()
        assert csv_text == csv_safe(want).write_csv()
        assert pl.read_csv(reports_dir / f"{name}.csv").height == want.height
        assert csv_text.splitlines()[0].split(",") == want.columns

    on_disk = json.loads((reports_dir / MANIFEST).read_text())
    assert on_disk == manifest
    assert before <= datetime.fromisoformat(on_disk["built_at"]) <= after
    assert on_disk["code_version"] == code_version() and on_disk["code_version"]
    assert on_disk["source_rows"] == len(sample_events())
    newest = max(e.ts for e in sample_events())
    assert datetime.fromisoformat(on_disk["newest_event"]) == newest
    assert set(on_disk["reports"]) == set(REPORTS)
    for name, info in on_disk["reports"].items():
        assert info["rows"] == pure[name].height
        assert info["files"] == [f"{name}.parquet", f"{name}.csv"]
        assert datetime.fromisoformat(info["built_at"]) >= datetime.fromisoformat(on_disk["built_at"])


def test_the_reports_carry_the_events_figures(events_db, tmp_path):
    """A spot check against the events themselves, independent of the report functions."""
    build(events_db, tmp_path / "reports")
    tenant_costs = pl.read_parquet(tmp_path / "reports" / "tenant_costs.parquet")
    events = sample_events()
    with_model = [e for e in events if e.tenant and e.model]
    assert tenant_costs["requests"].sum() == len(with_model)
    assert tenant_costs["errors"].sum() == sum(e.outcome != "ok" for e in with_model)
    assert tenant_costs["unpriced_requests"].sum() == sum(e.cost_usd is None and e.usage_source != "none"
                                                          for e in with_model)
    assert sum(c for c in tenant_costs["cost_usd"].to_list() if c is not None) == sum(
        e.cost_usd for e in events if e.cost_usd is not None)
    assert tenant_costs.schema["cost_usd"].is_decimal()
    assert sorted(set(tenant_costs["day"].to_list())) == sorted({e.ts.date() for e in events})
    denials = pl.read_parquet(tmp_path / "reports" / "denials.parquet")
    assert denials["count"].sum() == sum(e.outcome == "denied" for e in events)


def test_a_rebuild_from_the_same_events_is_byte_identical(tmp_path):
    events = sample_events()
    first_db, second_db = tmp_path / "first.duckdb", tmp_path / "second.duckdb"
    write_events(first_db, events)
    write_events(second_db, list(reversed(events)))  # same events, written in another order
    build(first_db, tmp_path / "a")
    build(first_db, tmp_path / "b")
    build(second_db, tmp_path / "c")
    for name in REPORTS:
        for suffix in (".parquet", ".csv"):
            original = (tmp_path / "a" / f"{name}{suffix}").read_bytes()
            assert (tmp_path / "b" / f"{name}{suffix}").read_bytes() == original, f"rerun changed {name}{suffix}"
            assert (tmp_path / "c" / f"{name}{suffix}").read_bytes() == original, f"order changed {name}{suffix}"


def test_no_events_give_empty_reports_and_no_newest_event(tmp_path):
    write_events(tmp_path / "events.duckdb", [])
    manifest = build(tmp_path / "events.duckdb", tmp_path / "reports")
    assert manifest["source_rows"] == 0 and manifest["newest_event"] is None
    for name in REPORTS:
        assert manifest["reports"][name]["rows"] == 0
        assert pl.read_parquet(tmp_path / "reports" / f"{name}.parquet").height == 0


def test_write_atomically_never_exposes_a_partial_file(tmp_path):
    small = pl.DataFrame({"k": ["a"], "v": [1]})
    large = pl.DataFrame({"k": [f"key-{i:06d}" for i in range(50_000)], "v": list(range(50_000))})
    write_atomically(small, tmp_path, "report")
    texts = {small.write_csv(), large.write_csv()}
    done = threading.Event()
    problems: list[str] = []
    reads = 0

    def poll() -> None:
        nonlocal reads
        while not done.is_set():
            # Read each file in one go, as a dashboard serving it would, then parse what was read.
            try:
                parquet = pl.read_parquet(io.BytesIO((tmp_path / "report.parquet").read_bytes()))
                if not (parquet.equals(small) or parquet.equals(large)):
                    problems.append(f"parquet with {parquet.height} rows")
                if (tmp_path / "report.csv").read_text() not in texts:
                    problems.append("a partial csv")
            except BaseException as exc:  # a truncated or missing file (Polars may panic on a truncated one)
                problems.append(f"{type(exc).__name__}: {exc}")
            reads += 1

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(60):
            assert write_atomically(large if i % 2 else small, tmp_path, "report") == ["report.parquet", "report.csv"]
    finally:
        done.set()
        reader.join()
    assert reads > 0
    assert problems == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.parquet"]


# --- CSV formula injection (OWASP) -----------------------------------------------------------------------
#: Tenant ids (from a JWT claim or tenants.csv) that a spreadsheet would run as formulas.
HOSTILE = ("=cmd|' /C calc'!A0", "+1", "-x", "@SUM(1)", "\tx", "\rx")


def hostile_events(now: datetime) -> list[Event]:
    """For each hostile tenant: one priced answer and one denial, this month."""
    events = []
    for i, tenant in enumerate(HOSTILE):
        common = dict(ts=now - timedelta(seconds=i + 1), tenant=tenant, user_pseudonym=ALICE, auth_method="jwt",
                      provider="openai", model="openai/gpt-4o-mini", endpoint="openai/chat.completions.create", attempts=1)
        events.append(Event(event_id=uuid.UUID(int=100 + 2 * i, version=4), **common, status_code=200, outcome="ok",
                            billing_mode="unified", input_tokens=10, output_tokens=5, cached_input_tokens=0,
                            usage_source="reported", cost_usd=Decimal("0.250000000"), latency_ms=12.0))
        events.append(Event(event_id=uuid.UUID(int=101 + 2 * i, version=4), **common, status_code=403,
                            outcome="denied", latency_ms=1.0))
    return events


def test_report_csvs_neutralise_formula_cells_and_parquet_stays_exact(tmp_path):
    now = datetime.now(UTC).replace(microsecond=0)
    write_events(tmp_path / "events.duckdb", hostile_events(now))
    tenants = {t: Tenant(t, f"name {t}", Decimal(10), Decimal(0)) for t in HOSTILE}
    # A negative credit (a correction) makes negative money: a number, never prefixed.
    billing = BillingInputs(tenants, [Credit("-x", Decimal("-1.50"), now)])
    con = read_only(tmp_path / "events.duckdb")
    try:
        build_reports(con, tmp_path / "reports", billing)
    finally:
        con.close()

    for name in ("tenant_costs", "user_costs", "denials", "statements"):
        parquet = pl.read_parquet(tmp_path / "reports" / f"{name}.parquet")
        assert sorted(parquet["tenant"].unique()) == sorted(HOSTILE), f"{name}.parquet keeps the exact tenants"
        csv_bytes = (tmp_path / "reports" / f"{name}.csv").read_bytes()
        assert csv_bytes == csv_safe(parquet).write_csv().encode(), name
        as_read = pl.read_csv(io.BytesIO(csv_bytes), infer_schema=False)
        assert sorted(as_read["tenant"].unique()) == sorted(f"'{t}" for t in HOSTILE), name
        assert b"'=cmd|' /C calc'!A0" in csv_bytes, name
        for column in parquet.select(pl.col(pl.String)).columns:  # no text cell may start like a formula
            assert not as_read[column].str.contains(r"^[=+\-@\t\r]").any(), f"{name}.{column}"

    statements = pl.read_parquet(tmp_path / "reports" / "statements.parquet")
    corrected = statements.filter(pl.col("tenant") == "-x")
    assert corrected["credits_added_usd"].to_list() == [Decimal("-1.50")]
    csv_rows = pl.read_csv(tmp_path / "reports" / "statements.csv", infer_schema=False).filter(
        pl.col("tenant") == "'-x")
    assert csv_rows["credits_added_usd"].to_list() == ["-1.50"]  # a money column is never prefixed
    assert csv_rows["credits_closing_usd"].to_list() == ["-1.50"]


def test_write_atomically_prefixes_text_cells_only(tmp_path):
    frame = pl.DataFrame({"label": ["-1", "ok", None], "amount": [Decimal("-1.50"), Decimal("2.00"), None],
                          "count": [-3, 4, None]}, schema_overrides={"amount": pl.Decimal(18, 2)})
    write_atomically(frame, tmp_path, "report")
    assert (tmp_path / "report.csv").read_text() == "label,amount,count\n'-1,-1.50,-3\nok,2.00,4\n,,\n"
    assert_frame_equal(pl.read_parquet(tmp_path / "report.parquet"), frame, check_exact=True)


# --- `tollway report run` -------------------------------------------------------------------------------


def test_report_run_without_a_gateway_builds_directly(deployment):
    write_events(deployment.path / "events.duckdb", sample_events())
    result = run_cli(deployment.path, "report", "run", "--json")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(result.stdout)
    assert manifest == json.loads((deployment.path / "reports" / MANIFEST).read_text())
    assert manifest["source_rows"] == len(sample_events())
    assert "asking the running gateway" not in result.stderr
    assert f"built by the CLI from {len(sample_events())} events" in result.stderr
    for name in REPORTS:
        assert (deployment.path / "reports" / f"{name}.parquet").exists()
        assert (deployment.path / "reports" / f"{name}.csv").exists()

    human = run_cli(deployment.path, "report", "run")
    assert human.returncode == 0, human.stderr
    assert all(name in human.stdout for name in REPORTS)


def test_report_run_asks_the_running_gateway(gateway):
    token = gateway.deployment.tokens["bob"]
    for i in range(3):
        reply = httpx.post(gateway.url + "/openai/v1/chat/completions", timeout=10,
                           headers={"authorization": f"Bearer {token}"},
                           json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {i}"}]})
        assert reply.status_code == 200, reply.text
    refused = httpx.post(gateway.url + "/openai/v1/chat/completions", timeout=10,
                         headers={"authorization": "Bearer tw_not-a-real-token"},
                         json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 401

    result = run_cli(gateway.deployment.path, "report", "run", "--json")
    assert result.returncode == 0, result.stderr + gateway.log()
    assert "asking the running gateway" in result.stderr
    assert "built by the gateway from 4 events" in result.stderr
    manifest = json.loads(result.stdout)
    assert manifest["source_rows"] == 4
    assert manifest["reports"]["denials"]["rows"] == 1
    reports_dir = gateway.deployment.path / "reports"
    assert not (reports_dir / ".run-requested").exists()
    tenant_costs = pl.read_parquet(reports_dir / "tenant_costs.parquet")
    assert tenant_costs.select("tenant", "model", "requests", "errors").rows() == [
        ("acme", "openai/gpt-4o-mini", 3, 0)]
    assert tenant_costs["cost_usd"][0] > 0


def test_report_run_without_events_db_is_refused_clearly(deployment):
    assert not (deployment.path / "events.duckdb").exists()
    result = run_cli(deployment.path, "report", "run")
    assert result.returncode == 1
    assert "no events yet" in result.stderr and "tollway serve" in result.stderr
    # A refusal is one `error: ...` line, like every other CLI refusal, not a Python traceback.
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: no events yet in "), result.stderr
    assert not (deployment.path / "reports" / MANIFEST).exists()
