"""`tollway demo`: a whole deployment on loopback with no provider keys and no network.

Creates a deployment directory (`proxy.demo_setup`), starts the simulated providers, writes a month
of history through the event writer, starts `tollway serve`, sends live traffic through it, builds
the reports, starts `tollway dashboard`, prints URLs and ready-to-paste snippets (the `export` lines
on stdout, everything else on stderr), and on Ctrl-C stops every child and says where the files are.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from analytics.jobs import run_now
from proxy import demo_setup
from proxy.history import write_history


def _port(preferred: int) -> int:
    """`preferred` if it is free on loopback, else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    """Poll `url` until it answers; fail early if the process behind it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} exited early (status {proc.returncode})")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"the {what} did not start within {timeout:.0f} s")


#: Set by SIGINT/SIGTERM. The handler only sets it: an exception raised from a signal handler can
#: land inside a C extension that swallows it (DuckDB checks for signals during queries), which once
#: left a demo running after its SIGTERM. Preparation checks the flag at every step instead.
_STOP = threading.Event()


def _request_stop(signum, frame) -> None:
    _STOP.set()


def _say(text: str, stream=None) -> None:
    """Print, ignoring a terminal or pipe that has gone away (the stop path must still run)."""
    with contextlib.suppress(OSError):
        print(text, file=stream or sys.stderr, flush=True)


def _stop_point() -> None:
    """Where a requested stop takes effect during preparation."""
    if _STOP.is_set():
        raise KeyboardInterrupt


def _step(message: str) -> None:
    """One line of progress (and a stop point)."""
    _stop_point()
    _say(f"  • {message}")


def snippets(gw: str, token: str, dashboard: str | None) -> str:
    return f"""
  Gateway     {gw}   (health {gw}/healthz, metrics {gw}/metrics)
  Dashboard   {dashboard or "not started (--no-dashboard)"}

  curl {gw}/openai/v1/chat/completions \\
    -H "Authorization: Bearer {token}" -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hi"}}]}}'

  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="{gw}/openai/v1", api_key="{token}"); \\
print(c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role":"user","content":"Hi"}}]).choices[0].message.content)'

  python3 -c 'from anthropic import Anthropic; c = Anthropic(base_url="{gw}/anthropic", api_key="{token}"); \\
print(c.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{{"role":"user","content":"Hi"}}]).content[0].text)'

  Coding agents and SDKs read these (Claude Code, Codex, the OpenAI and Anthropic SDKs):
"""


def exports(gw: str, token: str) -> str:
    """Shell lines that point the official SDKs (and agents built on them) at the demo gateway."""
    return (f"export OPENAI_BASE_URL={gw}/openai/v1\nexport OPENAI_API_KEY={token}\n"
            f"export ANTHROPIC_BASE_URL={gw}/anthropic\nexport ANTHROPIC_API_KEY={token}")


class Children:
    """The processes the demo started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    root = _demo_root(args)
    ports = {"simulator": _port(9090), "gateway": _port(args.port or 8080),
             "dashboard": None if args.no_dashboard else _port(8501)}
    _say(f"Tollway demo: preparing a deployment in {root}")
    children = Children()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _request_stop)
    try:
        gw, dash_url, token = _bring_up(root, args.days, ports, children)
        _stop_point()
        _say(f"\nReady in {time.monotonic() - started:.1f} s. Sample token: alice@acme.com (tenant acme, "
             f"role engineering).{snippets(gw, token, dash_url)}")
        _say(exports(gw, token), sys.stdout)
        _say(f"\nFiles: {root}. Press Ctrl-C to stop.")
        _wait_for_stop(children)
    except KeyboardInterrupt:
        pass
    except (DemoError, RuntimeError, OSError, httpx.HTTPError) as exc:
        if not _STOP.is_set():  # Ctrl-C in a terminal also stops the children, which then fail a step
            _say(f"\nerror: {exc}")
            return _stopped(children, root, 1)
    return _stopped(children, root, 0)


def _demo_root(args: argparse.Namespace) -> Path:
    """--keep DIR (or --data-dir), which must not hold a deployment yet; else a temporary directory."""
    keep = args.keep or args.data_dir
    root = Path(keep).expanduser().resolve() if keep else Path(tempfile.mkdtemp(prefix="tollway-demo-"))
    if keep and (root / "control.db").exists():
        from proxy.cli import CommandError

        raise CommandError(f"{root} already holds a deployment; pick a new directory for --keep")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _bring_up(root: Path, days: int, ports: dict, children: Children) -> tuple[str, str | None, str]:
    """Deployment, simulator, history, gateway, live traffic, reports, dashboard: the gateway URL,
    the dashboard URL (None without one) and the sample token."""
    sim_url, gw = f"http://127.0.0.1:{ports['simulator']}", f"http://127.0.0.1:{ports['gateway']}"
    tokens, keys = demo_setup.prepare(root, sim_url, ports["gateway"])
    _step(f"deployment: tenants acme (BYOK Anthropic) and globex (unified billing, "
          f"{demo_setup.GLOBEX_CREDITS} USD credits); 4 keys, {len(tokens)} tokens")
    sim = children.start([sys.executable, "-m", "proxy.simulator", "--port", str(ports["simulator"]), "--lifelike",
                          "--no-record", *(f"--key={p}={k}" for p, k in keys.items())], root / "simulator.log")
    count = write_history(root, demo_setup.WORKLOADS, days,
                          progress=lambda done: _step(f"history: {done:,} events written…"))
    budget = demo_setup.write_limits(root)
    _step(f"history: {count:,} demo events over {days} days (marked demo = true); "
          f"globex's monthly budget set to {budget} USD, near its limit")
    wait_healthy(f"{sim_url}/_sim/health", sim, "simulated provider")
    _step(f"simulated OpenAI, Anthropic and Gemini on {sim_url} (lifelike latency, occasional 429/503)")
    tollway = [sys.executable, "-m", "proxy.cli", "--data-dir", str(root)]
    gateway = children.start([*tollway, "serve"], root / "gateway.log")
    dashboard = None if ports["dashboard"] is None else children.start(
        [*tollway, "dashboard", "--port", str(ports["dashboard"])], root / "dashboard.log")
    wait_healthy(f"{gw}/healthz", gateway, "gateway")
    _step(f"gateway on {gw}")
    for line in demo_setup.live_traffic(gw, tokens):
        _step(line)
    manifest, _ = run_now(root, root / "events.duckdb", root / "reports")
    _step(f"reports built from {manifest['source_rows']:,} events in {manifest['build_seconds']} s "
          "(rebuilt every 30 s while the demo runs)")
    if dashboard is None:
        return gw, None, tokens["alice"]
    dash_url = f"http://127.0.0.1:{ports['dashboard']}"
    wait_healthy(f"{dash_url}/_stcore/health", dashboard, "dashboard", timeout=60)
    _step(f"dashboard on {dash_url}")
    return gw, dash_url, tokens["alice"]


class DemoError(Exception):
    pass


def _wait_for_stop(children: Children) -> None:
    """Until SIGINT or SIGTERM, or until a child dies (then say which)."""
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # from here on, a stop signal waits for sigtimedwait
    if _STOP.is_set():  # one that came before the block
        return
    while signal.sigtimedwait(stop, 1.0) is None:
        for proc in children.procs:
            if proc.poll() is not None:
                raise DemoError(f"a demo process exited unexpectedly ({' '.join(proc.args[2:5])}); see its log")


def _stopped(children: Children, root: Path, code: int) -> int:
    _say("\nStopping the dashboard, gateway and simulator…")
    children.stop()
    _say(f"Stopped. The demo's files are in {root}")
    return code
