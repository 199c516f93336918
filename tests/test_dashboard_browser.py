"""`tollway dashboard` end to end: the real command, a real headless Chromium (Debian's `chromium`
driven by Playwright), pages rendered from a deployment with history and reports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import polars as pl
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from dashboard.figures import money
from proxy.cli import main as cli_main
from tests.helpers import REPO, deployment_with_history, free_port

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


@pytest.mark.parametrize(("path", "title"), [("tenants", "Tenants"), ("billing", "Billing"),
                                             ("users", "Top spenders"), ("policy", "Policy")])
def test_every_page_renders_without_an_error(browser, dashboard, tmp_path, path, title):
    page = open_page(browser, f"{dashboard.url}/{path}")
    expect(page.locator("h1").first).to_have_text(title)
    visible(page, "stDataFrame")  # each page shows at least one table
    shoot(page, tmp_path, path)
    assert page.locator('[data-testid="stException"]').count() == 0


def test_statement_csv_download_matches_the_report(browser, dashboard, history, tmp_path):
    page = open_page(browser, f"{dashboard.url}/billing")
    page.get_by_text("Every period").click()
    with page.expect_download(timeout=30_000) as download:
        page.get_by_role("button", name="Download these statements (CSV)").click()
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
        assert page.locator('[data-testid="stException"]').count() == 0
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
