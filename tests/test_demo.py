"""`tollway demo` as a newcomer runs it: a subprocess, the printed endpoint and token used through
the official OpenAI SDK, then Ctrl-C (SIGINT), which must stop every child and exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import duckdb
import httpx
import openai
import pytest

from tests.helpers import REPO, free_port, run_cli


class Demo:
    """`tollway demo` in a subprocess, its stdout and stderr collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "proxy.cli", "demo", *args],
                                     cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    def wait_ready(self, timeout: float = 90) -> dict[str, str]:
        """The `export NAME=value` lines, once the demo says it is ready."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith("export ANTHROPIC_API_KEY=") for line in self.out):
            assert self.proc.poll() is None, f"demo exited early:\n{self.stderr}"
            assert time.monotonic() < deadline, f"demo not ready in {timeout} s:\n{self.stderr}"
            time.sleep(0.1)
        return dict(re.match(r"export (\w+)=(\S+)", line).groups() for line in self.out if line.startswith("export"))

    def wait(self, timeout: float = 60) -> int:
        """The exit status; if the demo hangs, its threads' tracebacks (SIGABRT + faulthandler) fail the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=10)
            time.sleep(0.5)
            raise AssertionError(f"demo did not exit in {timeout} s:\n{self.stderr[-6000:]}") from None

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def children(self) -> list[int]:
        """PIDs of the demo's child processes (from /proc)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(entry.name))
        return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def demo_dir(tmp_path) -> Path:
    return tmp_path / "demo"


def test_demo_serves_the_printed_endpoint_and_ctrl_c_stops_everything(demo_dir):
    demo = Demo("--no-dashboard", "--days", "3", "--port", str(free_port()), "--keep", str(demo_dir))
    try:
        env = demo.wait_ready()
        children = demo.children()
        assert len(children) == 2, "the simulated provider and the gateway"
        client = openai.OpenAI(base_url=env["OPENAI_BASE_URL"], api_key=env["OPENAI_API_KEY"])
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content and reply.usage.total_tokens > 0
        claude = anthropic.Anthropic(base_url=env["ANTHROPIC_BASE_URL"], api_key=env["ANTHROPIC_API_KEY"])
        assert claude.messages.create(model="claude-sonnet-4-5", max_tokens=32,
                                      messages=[{"role": "user", "content": "Hi"}]).content[0].text
        assert f"export OPENAI_API_KEY={env['OPENAI_API_KEY']}" in "".join(demo.out)
        assert "curl " in demo.stderr and "from openai import OpenAI" in demo.stderr
        assert "from anthropic import Anthropic" in demo.stderr and "Ready in" in demo.stderr
    finally:
        demo.proc.send_signal(signal.SIGINT)
        code = demo.wait()
    assert code == 0
    assert not [pid for pid in children if alive(pid)], "every child process is gone"
    assert f"The demo's files are in {demo_dir}" in demo.stderr


def test_demo_prepares_history_refusals_reports_and_the_dashboard(demo_dir):
    demo = Demo("--days", "5", "--port", str(free_port()), "--keep", str(demo_dir))
    try:
        demo.wait_ready()
        children = demo.children()
        assert len(children) == 3, "simulated provider, gateway and dashboard"
        dashboard = re.search(r"Dashboard\s+(http://127\.0\.0\.1:\d+)", demo.stderr).group(1)
        assert httpx.get(f"{dashboard}/_stcore/health", timeout=10).status_code == 200
        manifest = (demo_dir / "reports" / "manifest.json")
        assert manifest.exists(), "reports are built before the demo says it is ready"
        for line in (r"403\s+bob → anthropic", r"429\s+bob → openai/gpt-4o-mini, call 4 of 4", r"200 \(\d+ chunks\)"):
            assert re.search(line, demo.stderr), f"the live traffic shows {line}"
    finally:
        demo.proc.send_signal(signal.SIGINT)
        code = demo.wait()
    assert code == 0 and not [pid for pid in children if alive(pid)]
    con = duckdb.connect(str(demo_dir / "events.duckdb"), read_only=True)
    try:
        days, demo_rows, live = con.execute(
            "SELECT count(DISTINCT CAST(ts AS DATE)), count(*) FILTER (demo), count(*) FILTER (NOT demo) "
            "FROM events").fetchone()
        outcomes = {row[0] for row in con.execute("SELECT DISTINCT outcome FROM events WHERE NOT demo").fetchall()}
        unpriced, sources = con.execute(
            "SELECT count(*) FILTER (cost_usd IS NULL AND usage_source <> 'none'), "
            "list(DISTINCT price_source) FILTER (usage_source <> 'none') FROM events").fetchone()
    finally:
        con.close()
    assert unpriced == 0 and sources == ["genai-prices 0.2.5"], "every demo model is priced by the price book"
    check = run_cli(demo_dir, "pricing", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert days >= 5 and demo_rows > 500, "history over the requested days, marked demo"
    assert live >= 8 and {"ok", "denied", "rate_limited"} <= outcomes, "live traffic went through the gateway"
    assert "globex,tenant,usd,month," in (demo_dir / "policy" / "limits.csv").read_text()


def test_demo_refuses_an_existing_deployment_for_keep(demo_dir):
    from proxy.cli import main as cli_main

    assert cli_main(["init", str(demo_dir)]) == 0
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "demo", "--keep", str(demo_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env={**os.environ})
    assert result.returncode == 1
    assert "already holds a deployment" in result.stderr


def test_sigterm_while_preparing_stops_the_children_it_started(demo_dir):
    demo = Demo("--no-dashboard", "--days", "60", "--port", str(free_port()), "--keep", str(demo_dir))
    deadline = time.monotonic() + 60
    while not demo.children():  # the simulated provider starts first, then the history is written
        assert demo.proc.poll() is None and time.monotonic() < deadline, demo.stderr
        time.sleep(0.02)
    children = demo.children()
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.wait() == 0
    assert not [pid for pid in children if alive(pid)], "no process is left behind"
    assert "Stopped. The demo's files are in" in demo.stderr and "Ready in" not in demo.stderr
