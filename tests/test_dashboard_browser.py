"""`tollway dashboard` end to end: the real command, a real headless Chromium (Debian's `chromium`
driven by Playwright), pages rendered from deployments with a month of history, with one day of
sub-cent spend, with reports built from no events, and with no reports at all.

Tables are drawn on a canvas; the grid's accessible twin (`role="gridcell"`, `role="columnheader"`)
holds the text each cell shows, and charts are SVG, so both are read as text here. One dashboard
process serves each deployment for the whole module.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import polars as pl
import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from dashboard.figures import money
from proxy.cli import main as cli_main
from tests.helpers import REPO, deployment_with_history, free_port
from tests.test_dashboard import record_and_build, subcent_single_day

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> Path:
    return deployment_with_history(tmp_path_factory.mktemp("dash") / "data", days=40).path


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM, "these tests need Chromium: `apt-get install chromium` (.ci/run installs it)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


class Dashboard:
    """`tollway dashboard` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"dashboard-{self.port}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(data_dir), "dashboard",
                                      "--port", str(self.port)], cwd=REPO, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/_stcore/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"dashboard did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def dashboard(history):
    running = Dashboard(history)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def subcent(tmp_path_factory):
    """`tollway dashboard` on a first day of sub-cent spend (see `subcent_single_day`)."""
    running = Dashboard(subcent_single_day(tmp_path_factory.mktemp("subcent") / "data"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def no_traffic(tmp_path_factory):
    """`tollway dashboard` on reports built from no events."""
    data = tmp_path_factory.mktemp("no-traffic") / "data"
    assert cli_main(["init", str(data)]) == 0
    record_and_build(data, [])
    running = Dashboard(data)
    yield running
    running.stop()


def open_page(browser, url: str) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1400}, accept_downloads=True)
    page.goto(url)
    expect(page.locator("h1").first).to_be_visible(timeout=60_000)
    return page


def shoot(page: Page, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot (kept in the test's temp dir for people to look at)."""
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def visible(page: Page, testid: str) -> None:
    expect(page.locator(f'[data-testid="{testid}"]').first).to_be_visible(timeout=30_000)


def metric(page: Page, label: str):
    return page.locator('[data-testid="stMetric"]').filter(has_text=label).locator('[data-testid="stMetricValue"]')


def pick(page: Page, label: str, option: str) -> None:
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def cells(page: Page) -> list[str]:
    """The text of every table cell on the page, as shown."""
    return page.locator('[data-testid="stDataFrame"] [role="gridcell"]').all_text_contents()


def headers(page: Page) -> list[str]:
    return page.locator('[data-testid="stDataFrame"] [role="columnheader"]').all_text_contents()


def chart_texts(page: Page, index: int = 0) -> list[str]:
    """Every text of a daily chart (axis labels, titles, legend), in drawing order, once it is drawn."""
    svg = page.locator('[data-testid="stVegaLiteChart"]').nth(index).locator("svg")
    expect(svg.locator("text", has_text="day (UTC)")).to_have_count(1, timeout=30_000)  # Vega draws after the page
    return svg.locator("text").all_text_contents()


def has_header(page: Page, header: str) -> None:
    """Wait until a table with this header is drawn (the grid's cells are in the DOM, not visible)."""
    expect(page.locator(f'[data-testid="stDataFrame"] [role="columnheader"]:text-is("{header}")').first) \
        .to_have_count(1, timeout=30_000)


def reads_right(page: Page) -> None:
    """What every page must be, whatever the data: no exception, human headers, no None or nan cell."""
    assert page.locator('[data-testid="stException"]').count() == 0
    shown = headers(page)
    assert all("_" not in h for h in shown), shown
    # a null cell the grid draws as "None" reads "" in its accessible twin: no cell may be empty
    assert not {"", "None", "nan", "NaN", "null", "<NA>"} & set(cells(page)), cells(page)


def newest_period_spend(history: Path, tenant: str | None = None) -> str:
    costs = pl.read_parquet(history / "reports" / "tenant_costs.parquet")
    period = costs["day"].max().strftime("%Y-%m")
    rows = costs.filter(pl.col("day").dt.strftime("%Y-%m") == period)
    if tenant:
        rows = rows.filter(pl.col("tenant") == tenant)
    return money(sum(rows["cost_usd"].drop_nulls().to_list(), Decimal(0)))


def test_overview_renders_title_and_the_months_spend_from_the_reports(browser, dashboard, history, tmp_path):
    page = open_page(browser, dashboard.url)
    expect(page.locator("h1").first).to_have_text("Overview")
    expect(metric(page, "Spend").first).to_have_text(newest_period_spend(history), timeout=30_000)
    visible(page, "stVegaLiteChart")  # the daily spend chart
    assert shoot(page, tmp_path, "overview").stat().st_size > 20_000, "the screenshot is not a blank page"


def test_tenant_filter_switches_the_figures(browser, dashboard, history, tmp_path):
    page = open_page(browser, dashboard.url)
    pick(page, "Tenant", "acme")
    expect(page.get_by_text("acme · ", exact=False).first).to_be_visible(timeout=30_000)
    expect(metric(page, "Spend").first).to_have_text(newest_period_spend(history, "acme"), timeout=30_000)


#: Every page: its path, its title, and the header of the table it draws last when it has data.
PAGES = [("", "Overview", "Refusals"), ("tenants", "Tenants", "Forecast over limit"),
         ("billing", "Billing", "Credits at closing (USD)"), ("users", "Top spenders", "User (pseudonym)"),
         ("policy", "Policy", "Refused requests")]


def each_page(browser, running: Dashboard, tmp_path: Path, name: str):
    """Open every page in turn (one tab), wait until its last table is drawn, check what every page must
    be, keep a screenshot, and yield (path, page) for the caller's own checks."""
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    for path, title, last in PAGES:
        page.goto(f"{running.url}/{path}")
        expect(page.locator("h1").first).to_have_text(title, timeout=60_000)
        has_header(page, last)
        reads_right(page)
        shoot(page, tmp_path, f"{name}-{path or 'overview'}")
        yield path, page
    page.close()


def test_every_page_reads_right_with_a_month_of_history(browser, dashboard, tmp_path):
    for path, page in each_page(browser, dashboard, tmp_path, "history"):
        assert page.locator('[data-testid="stVegaLiteChart"]').count() >= (path != "billing"), path


#: Hand-written: what each page's tables show for `subcent_single_day` (money under a cent in four
#: significant digits, an em dash for what is unknown or absent, statements in cents).
SUBCENT_CELLS = {"": {"$0.0002", "$0.0001235"}, "tenants": {"$0.0002", "$0.0001235", "$0.00", "$5,000.00", "—"},
                 "billing": {"2026", "$0.00"}, "users": {"$0.0002", "$0.0001235", "$0.00"},
                 "policy": {"anthropic/claude-opus-4-1", "denied", "rate_limited"}}
SUBCENT_HEADERS = {"": {"Tenant", "Errors", "Refusals", "Cost (USD)"}, "tenants": {"Total (USD)", "User (pseudonym)"},
                   "billing": {"Unified cost (USD)", "Credits at opening (USD)", "Amount due (USD)"},
                   "users": {"User (pseudonym)", "Cost (USD)"}, "policy": {"Outcome", "Refused requests"}}


def test_every_page_reads_right_with_one_day_of_subcent_spend(browser, subcent, tmp_path):
    for path, page in each_page(browser, subcent, tmp_path, "subcent"):
        shown = set(cells(page))
        if path == "billing":  # the period column reads 2026-MM: check the year only
            shown |= {c[:4] for c in shown}
        assert SUBCENT_CELLS[path] <= shown, (path, shown)
        assert SUBCENT_HEADERS[path] <= set(headers(page)), (path, headers(page))


def test_subcent_overview_card_axis_and_day(browser, subcent, tmp_path):
    page = open_page(browser, subcent.url)
    expect(metric(page, "Spend").first).to_have_text("$0.0003235", timeout=30_000)
    expect(page.get_by_text("is only partly covered", exact=False)).to_be_visible()
    has_header(page, "Refusals")
    texts = chart_texts(page)
    ticks = [t for t in texts if t.startswith("$")]
    assert "$0.00010" in ticks and len(ticks) == len(set(ticks)) > 2, ticks  # one format, distinct ticks
    today = datetime.now(UTC).strftime("%b %d")
    assert texts.count(today) == 1, texts  # one day of data: one date on the x axis
    assert {"acme", "globex"} <= set(texts)
    reads_right(page)


def test_spend_legends_leave_refused_and_misspelt_models_out(browser, subcent, tmp_path):
    page = open_page(browser, f"{subcent.url}/tenants")
    has_header(page, "Forecast over limit")
    legend = chart_texts(page)  # the "By model" tab
    assert {"openai/gpt-4o-mini", "openai/gpt-4.1"} <= set(legend), legend
    assert not {"anthropic/claude-opus-4-1", "openai/gpt-4o-mnii"} & set(legend), legend


def test_every_page_says_no_traffic_yet_when_reports_hold_no_events(browser, no_traffic, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    for path, title, _ in PAGES:
        page.goto(f"{no_traffic.url}/{path}")
        expect(page.locator("h1").first).to_have_text(title, timeout=60_000)
        message = "No request was refused" if path == "policy" else "No traffic recorded yet"
        expect(page.get_by_text(message, exact=False).first).to_be_visible(timeout=30_000)
        reads_right(page)
    page.close()


def test_statement_csv_download_matches_the_report(browser, dashboard, history, tmp_path):
    page = open_page(browser, f"{dashboard.url}/billing")
    page.get_by_text("Every period").click()
    # the rerun the toggle starts replaces the button; until it does, the old one gives this period's file
    button = page.get_by_role("button", name="Download these statements (CSV)")
    download = None
    for _ in range(20):
        try:
            expect(button).to_have_count(1, timeout=30_000)  # mid-rerun the old and the new one stand side by side
            with page.expect_download(timeout=30_000) as download:
                button.click(timeout=5_000)
        except PlaywrightError:  # a rerun put a second button beside the first meanwhile: look again
            download = None
            page.wait_for_timeout(250)
            continue
        if download.value.suggested_filename == "statements-all-all-tenants.csv":
            break
        page.wait_for_timeout(250)
    assert download is not None and download.value.suggested_filename == "statements-all-all-tenants.csv"
    saved = tmp_path / "statements.csv"
    download.value.save_as(saved)
    assert saved.read_bytes() == (history / "reports" / "statements.csv").read_bytes()


def test_an_empty_deployment_gets_a_helpful_message_not_an_error(browser, tmp_path):
    empty = tmp_path / "empty"
    assert cli_main(["init", str(empty)]) == 0
    running = Dashboard(empty)
    try:
        page = open_page(browser, running.url)
        expect(page.get_by_text("No reports yet.")).to_be_visible(timeout=30_000)
        shoot(page, tmp_path, "empty")
        expect(page.get_by_text("tollway report run", exact=False).first).to_be_visible()
        reads_right(page)
        for path, title, _ in PAGES[1:]:
            page.goto(f"{running.url}/{path}")
            expect(page.locator("h1").first).to_have_text(title, timeout=60_000)
            expect(page.get_by_text("tollway report run", exact=False).first).to_be_visible(timeout=30_000)
            reads_right(page)
    finally:
        running.stop()


def test_dashboard_refuses_a_port_in_use_with_a_clear_message(history):
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "proxy.cli", "--data-dir", str(history), "dashboard",
                                 "--port", str(port)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr


def test_dashboard_refuses_a_directory_that_is_not_a_deployment(tmp_path):
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "--data-dir", str(tmp_path / "nowhere"),
                             "dashboard"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 1
    assert "tollway init" in result.stderr
