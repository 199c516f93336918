"""Dashboard benchmark: how long each page takes with a year of reports for 50 tenants.

    python tests/perf/bench_dashboard.py [--events 2000000]

Builds a deployment with 50 tenants (each with a monthly USD budget), fills `events.duckdb` with a
year of synthetic events in SQL, builds the real reports, then times every page two ways:
the page script alone (Streamlit `AppTest`, first run with cold caches, then warm), and a real
headless Chromium loading the page from `tollway dashboard` until its title and its first chart
or table are visible. Target: every page under 2 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from analytics.jobs import run_now  # noqa: E402
from proxy.cli import main as cli_main  # noqa: E402
from proxy.recorder import open_events_db  # noqa: E402
from tests.helpers import REPO, free_port  # noqa: E402

PAGES = {"overview": "Overview", "tenants": "Tenants", "billing": "Billing", "users": "Top spenders",
         "policy": "Policy"}
YEAR = """
INSERT INTO events
SELECT uuid(), date_trunc('day', now()) - INTERVAL 365 DAY + to_microseconds(CAST(i * (31536000000000 // {n}) AS BIGINT)),
       't' || lpad(CAST(i % 50 AS VARCHAR), 2, '0'), CAST(md5('u' || CAST(i % 5000 AS VARCHAR)) AS UUID), 'token',
       split_part(m, '/', 1), m, 'chat/completions', i % 4 = 0,
       CASE WHEN i % 41 = 0 THEN 403 WHEN i % 89 = 0 THEN 502 ELSE 200 END,
       CASE WHEN i % 41 = 0 THEN 'denied' WHEN i % 89 = 0 THEN 'upstream_error' ELSE 'ok' END,
       'k', CASE WHEN i % 5 = 0 THEN 'byok' ELSE 'unified' END, 100 + i % 1900, 20 + i % 600, i % 50, 0, 0,
       CASE WHEN i % 41 = 0 THEN 'none' ELSE 'reported' END,
       CASE WHEN i % 41 = 0 THEN NULL ELSE CAST((i % 1000) * 0.00001234 AS DECIMAL(18, 9)) END,
       300.0 + i % 1500, 50.0 + i % 300, 290.0 + i % 1400, 1, true
FROM (SELECT i, ['openai/gpt-4o-mini', 'anthropic/claude-sonnet-4-5', 'gemini/gemini-2.5-flash', 'openai/gpt-4.1',
                 'anthropic/claude-haiku-4-5', 'gemini/gemini-2.5-pro'][(i // 50) % 6 + 1] AS m FROM range({n}) t(i))
"""


def build(root: Path, events: int) -> Path:
    data = root / "data"
    assert cli_main(["init", str(data)]) == 0
    (data / "tenants.csv").write_text("tenant,name,markup_pct,byok_fee_pct\n"
                                      + "".join(f"t{i:02d},Tenant {i},10,2\n" for i in range(50)))
    (data / "policy" / "access.csv").write_text("p, *, *, *, allow\n")
    (data / "policy" / "routes.csv").write_text("")
    (data / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n"
                                                + "".join(f"t{i:02d},tenant,usd,month,{100 + i * 10}\n" for i in range(50)))
    started = time.perf_counter()
    con = open_events_db(data / "events.duckdb")
    con.execute(YEAR.format(n=events)).fetchall()
    con.close()
    print(f"filled {events:,} events in {time.perf_counter() - started:.1f} s", flush=True)
    manifest, _ = run_now(data, data / "events.duckdb", data / "reports")
    rows = {name: report["rows"] for name, report in manifest["reports"].items()}
    print(f"reports built in {manifest['build_seconds']} s: {rows}", flush=True)
    return data


def time_scripts(data: Path) -> None:
    from streamlit.testing.v1 import AppTest

    os.environ["TOLLWAY_DATA_DIR"] = str(data)
    app = AppTest.from_file(str(REPO / "dashboard" / "streamlit_app.py"), default_timeout=120)
    print("\npage script (AppTest)      cold s   warm s   warm, one tenant s")
    for page in PAGES:
        timings = []
        for tenant in ("All tenants", "All tenants", "t07"):
            if page != "overview" or timings:
                app.switch_page(f"app_pages/{page}.py")
            started = time.perf_counter()
            app.run() if not timings else app.selectbox(key="tenant").select(tenant).run()
            timings.append(time.perf_counter() - started)
            assert not app.exception, app.exception
        app.selectbox(key="tenant").select("All tenants").run()
        print(f"  {page:24} {timings[0]:7.2f}  {timings[1]:7.2f}  {timings[2]:7.2f}")


def time_browser(data: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    log = (data / "dashboard-bench.log").open("wb")
    server = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(data), "dashboard", "--port",
                               str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        print("\nheadless Chromium (load → title and first chart/table visible)   first s   again s")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"),
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            for path, title in PAGES.items():
                timings = []
                for _ in range(2):
                    started = time.perf_counter()
                    page.goto(f"{url}/{path}" if path != "overview" else url)
                    expect(page.locator("h1").first).to_have_text(title, timeout=60_000)
                    expect(page.locator('[data-testid="stVegaLiteChart"], [data-testid="stDataFrame"]').first
                           ).to_be_visible(timeout=60_000)
                    timings.append(time.perf_counter() - started)
                print(f"  {path:62} {timings[0]:7.2f}  {timings[1]:7.2f}")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=2_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tollway-bench-dash-") as tmp:
        data = build(Path(tmp), args.events)
        time_scripts(data)
        time_browser(data)


if __name__ == "__main__":
    main()
