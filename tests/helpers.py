"""Real test fixtures' building blocks: a deployment directory, a `tollway serve` process, the CLI."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx

from proxy.cli import main as cli_main
from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key

REPO = Path(__file__).resolve().parent.parent
#: The only keys the simulated providers accept: the gateway must inject exactly these.
SIM_KEYS = {"openai": "sk-sim-openai-key-0001", "anthropic": "sk-ant-sim-key-0002", "gemini": "gm-sim-key-0003"}


#: The routes every test deployment uses: acme pays Anthropic itself, the operator pays the rest.
ROUTES = """p, acme, anthropic/*, acme-anthropic
p, *, openai/*, operator-openai
p, *, gemini/*, operator-gemini
p, *, anthropic/*, operator-anthropic
"""


#: Each test process (pytest-xdist worker) hands out ports from its own block, below the kernel's
#: ephemeral range (32768+), in turn: two workers, or a port just closed, never collide.
_PORT_BLOCK = 4000
_next_port = itertools.count()


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    # Separate checkouts' suites running at once on one machine can each set their own base.
    base = int(os.environ.get("TOLLWAY_TEST_PORT_BASE", "16000")) + int(worker.removeprefix("gw") or 0) % 4 * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + next(_next_port) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    raise RuntimeError(f"no free port in {base}-{base + _PORT_BLOCK - 1}")


def run_cli(data_dir: Path | None, *args: str, stdin: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `tollway` command in a subprocess."""
    argv = [sys.executable, "-m", "proxy.cli"] + (["--data-dir", str(data_dir)] if data_dir else []) + list(args)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **(env or {})})


class Deployment:
    """A deployment directory made by `tollway init`, pointed at the simulated providers."""

    def __init__(self, path: Path, sim_url: str) -> None:
        self.path = path
        self.port = free_port()
        self.sim_url = sim_url
        assert cli_main(["init", str(path)]) == 0
        self.write_toml()
        (path / "policy" / "routes.csv").write_text(ROUTES)
        self.tokens: dict[str, str] = {}

    def write_toml(self, extra: str = "", providers: dict[str, str] | None = None) -> None:
        urls = {name: f"{self.sim_url}/{name}" for name in ("openai", "anthropic", "gemini")}
        urls.update(providers or {})
        sections = "".join(f'[providers.{n}]\nbase_url = "{u}"\nread_timeout_s = 5\n\n' for n, u in urls.items())
        (self.path / "tollway.toml").write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\n\n{sections}[events]\nflush_interval_ms = 200\n{extra}\n')

    def twin(self, path: Path) -> Deployment:
        """The same deployment (master key, policy, settings, control store, tokens) in another directory on
        another port, as a second machine has it, with events of its own. Write its tollway.toml next."""
        shutil.copytree(self.path, path, ignore=shutil.ignore_patterns("events.duckdb*", "*.log", "reports", "spool"))
        other = copy.copy(self)
        other.path, other.port, other.tokens = path, free_port(), dict(self.tokens)
        return other

    def add_test_keys(self) -> None:
        """The keys every test deployment routes to (see ROUTES): one operator key per provider, and
        acme's own Anthropic key."""
        for provider in ("openai", "gemini", "anthropic"):
            self.add_key(f"operator-{provider}", provider, SIM_KEYS[provider])
        self.add_key("acme-anthropic", "anthropic", SIM_KEYS["anthropic"], tenant="acme")

    def store(self) -> ControlStore:
        return ControlStore(self.path / "control.db", Keyring(load_master_key(self.path)))

    def add_key(self, key_id: str, provider: str, secret: str, tenant: str | None = None) -> None:
        store = self.store()
        store.add_key(key_id, provider, secret, tenant)
        store.close()

    def issue_token(self, name: str, tenant: str, user: str, roles: tuple[str, ...] = (),
                    expires_at=None) -> str:
        store = self.store()
        _, token = store.create_token(tenant, user, list(roles), expires_at)
        store.close()
        self.tokens[name] = token
        return token

    def events(self) -> list[dict]:
        """Every event row (the gateway must be stopped: DuckDB allows one process at a time)."""
        con = duckdb.connect(str(self.path / "events.duckdb"), read_only=True)
        try:
            cursor = con.execute("SELECT * FROM events ORDER BY ts")
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            con.close()


class GatewayProcess:
    """`tollway serve` in a subprocess on a loopback port."""

    #: Every process started, so the session can end any a failed test left running (tests/conftest.py).
    started: list[subprocess.Popen] = []

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.url = f"http://127.0.0.1:{deployment.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = deployment.path / "gateway.log"

    def start(self, timeout: float = 20) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(self.deployment.path),
                                      "serve"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        GatewayProcess.started.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"gateway did not become healthy:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def dumps(rows: list[dict]) -> str:
    return json.dumps(rows, default=str, indent=1)


#: Two tenants' traffic for history-backed tests: acme mixes its own Anthropic key (BYOK) with the
#: operator's OpenAI key; bob has no engineering role, so his Claude calls are denied by the policy.
HISTORY_WORKLOADS = (
    ("acme", (("alice@acme.com", ("engineering",)), ("bob@acme.com", ()), ("dan@acme.com", ("engineering",))),
     (("anthropic/claude-sonnet-4-5", 5), ("openai/gpt-4o-mini", 3), ("anthropic/claude-haiku-4-5", 2)), 120),
    ("globex", (("carol@globex.com", ()), ("erin@globex.com", ())),
     (("openai/gpt-4.1", 3), ("gemini/gemini-2.5-flash", 4), ("openai/gpt-4o-mini", 2)), 90),
)


def deployment_with_history(path: Path, days: int = 40, now=None, build: bool = True) -> Deployment:
    """A deployment (no gateway running) with the test keys, `days` days of synthetic history written
    through the event writer, 50 USD of credits for globex, and (when `build`) its reports."""
    from analytics.jobs import run_now
    from proxy.history import Workload, write_history

    deployment = Deployment(path, "http://127.0.0.1:9")
    deployment.add_test_keys()
    write_history(path, [Workload(*w) for w in HISTORY_WORKLOADS], days, now=now)
    store = deployment.store()
    store.add_credits("globex", Decimal("50"), "prepaid")
    store.close()
    if build:
        run_now(path, path / "events.duckdb", path / "reports")
    return deployment


#: access.csv for limit and budget tests: acme may use every OpenAI model, engineering Claude too.
OPEN_ACCESS = """p, *, acme, openai/*, allow
p, role:engineering, acme, anthropic/claude-*, allow
p, *, globex, openai/*, allow
p, *, globex, gemini/*, allow
g, alice@acme.com, role:engineering, acme
"""


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of `name` in Prometheus text whose labels include `labels`."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def refused_after(gw: GatewayProcess, token: str, limit_s: float = 3.0) -> float:
    """Seconds until the gateway answers 401 to `token` (polling a cheap authenticated route); inf past `limit_s`."""
    start = time.monotonic()
    with httpx.Client(base_url=gw.url, timeout=5) as http:
        while time.monotonic() - start < limit_s:
            status = http.get("/openai/v1/models", headers={"authorization": f"Bearer {token}"}).status_code
            if status == 401:
                return time.monotonic() - start
            assert status == 200, status
            time.sleep(0.01)
    return float("inf")
