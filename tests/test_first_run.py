"""The README's "A real deployment in five minutes", followed literally on a fresh directory.

The bash and Python blocks are read out of README.md, so this test breaks when the README drifts.
Only the environment is replaced: commands run in a new temporary directory, `tollway` is this
checkout's CLI, `export` sets the variable for the commands that follow, `echo X | tollway ...` feeds
X on stdin, and the two long-running commands get free ports (`tollway simulator --port`, which
`tollway init --simulated` then follows through `--simulator-url`, and `tollway serve --port`, started
in the background). The Python block then runs as written, with the token that `tokens create`
printed and the gateway's port: the official OpenAI and Anthropic SDKs must both get their answer.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from proxy.demo import wait_healthy
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.timeout(60)

SECTION = "## A real deployment in five minutes"
README_PORT = "http://127.0.0.1:8080"


def readme_blocks() -> tuple[str, str]:
    """The section's first bash block and first Python block."""
    text = (REPO / "README.md").read_text()
    start = text.index(SECTION)
    section = text[start:text.index("\n## ", start)]
    bash = re.search(r"```bash\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    assert bash and python, "the section must hold a bash block and a Python block"
    return bash.group(1), python.group(1)


class Session:
    """A shell that runs the README's commands in `cwd`, the way a newcomer's terminal would."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
        self.env["PYTHONPATH"] = str(REPO)
        self.background: list[subprocess.Popen] = []
        self.outputs: dict[str, subprocess.CompletedProcess] = {}
        self.sim_url = f"http://127.0.0.1:{free_port()}"
        self.gateway_url = f"http://127.0.0.1:{free_port()}"

    def run(self, line: str) -> None:
        words = shlex.split(line, comments=True)
        if not words or words[:3] == ["pip", "install", "-e"]:  # the checkout is what runs
            return
        if words[0] == "export":
            for assignment in words[1:]:
                name, _, value = assignment.partition("=")
                self.env[name] = value.replace("$PWD", str(self.cwd))
            return
        stdin = None
        if "|" in words:
            cut = words.index("|")
            assert words[0] == "echo" and cut == 2, f"unexpected pipe in the README: {line}"
            stdin, words = words[1] + "\n", words[cut + 1:]
        assert words[0] == "tollway", f"the README's block has a command this test does not know: {line}"
        self.tollway(line, words[1:], stdin)

    def tollway(self, line: str, args: list[str], stdin: str | None) -> None:
        if args[-1] == "&":
            args = args[:-1]
        if args[0] == "simulator":
            self.start([*args, "--port", self.sim_url.rsplit(":", 1)[1]], f"{self.sim_url}/_sim/health")
        elif args[0] == "serve":
            self.start([*args, "--port", self.gateway_url.rsplit(":", 1)[1]], f"{self.gateway_url}/healthz")
        else:
            if args[0] == "init" and "--simulated" in args:
                args = [*args, "--simulator-url", self.sim_url]
            result = subprocess.run(self.argv(args), input=stdin, capture_output=True, text=True, timeout=60,
                                    cwd=self.cwd, env=self.env)
            assert result.returncode == 0, f"{line}\nexit {result.returncode}\n{result.stdout}\n{result.stderr}"
            self.outputs[" ".join(args[:2])] = result

    def argv(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", *args]

    def start(self, args: list[str], health_url: str) -> None:
        log = (self.cwd / f"{args[0]}.log").open("w")
        proc = subprocess.Popen(self.argv(args), cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.background.append(proc)
        try:
            wait_healthy(health_url, proc, args[0], timeout=20)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{(self.cwd / f'{args[0]}.log').read_text()}") from exc

    def stop(self) -> list[int]:
        """SIGTERM to the background commands, newest first; their exit codes."""
        for proc in reversed(self.background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=30) for proc in self.background]


def test_the_readme_five_minute_deployment_works_offline_as_written(tmp_path):
    bash, python = readme_blocks()
    shell = Session(tmp_path)
    try:
        for line in bash.splitlines():
            shell.run(line)
        token = shell.outputs["tokens create"].stdout.strip()
        assert token.startswith("tw_")
        assert python.count('"tw_..."') == 1 and README_PORT in python
        calls = subprocess.run([sys.executable, "-c", python.replace('"tw_..."', repr(token))
                                .replace(README_PORT, shell.gateway_url)],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path, env=shell.env)
    finally:
        codes = shell.stop()
    assert calls.returncode == 0, calls.stderr
    assert calls.stdout.splitlines() == [
        "This is a simulated reply from gpt-4o-mini word8 word9 word10 word11 word12",
        "This is a simulated reply from claude-sonnet-4-5 word8 word9 word10 word11 word12"]
    assert codes == [0, 0]  # simulator and gateway stop cleanly

    check = shell.outputs["policy check"].stderr.splitlines()
    assert check[-1] == (f"checked {tmp_path / 'data'}: 6 access rules, 1 role links, 2 routes, 3 limits, "
                         "2 tenants: 0 error(s), 1 warning(s)")
    assert check[0].startswith("policy/access.csv:7: warning: allows gemini/* in tenant globex, but no route")

    con = duckdb.connect(str(tmp_path / "data" / "events.duckdb"), read_only=True)
    try:
        events = con.execute("SELECT tenant, model, key_id, billing_mode, status_code FROM events ORDER BY ts").fetchall()
    finally:
        con.close()
    assert events == [("acme", "openai/gpt-4o-mini", "operator-openai", "unified", 200),
                      ("acme", "anthropic/claude-sonnet-4-5", "acme-anthropic", "byok", 200)]
