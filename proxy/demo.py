"""`tollway demo`: a whole deployment on loopback with no provider keys and no network.

Creates a deployment directory, starts the simulated providers and `tollway serve` as child
processes, issues tokens, sends a little live traffic through the real gateway, prints ready-to-paste
snippets, and on Ctrl-C stops every child and says where the files are.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key

DEMO_PROVIDERS = ("openai", "anthropic", "gemini")


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


def _step(message: str) -> None:
    print(f"  • {message}", file=sys.stderr, flush=True)


def prepare(root: Path, sim_port: int, gw_port: int) -> dict[str, str]:
    """A deployment from the samples, pointed at the simulator, with keys and tokens."""
    from proxy.cli import init_deployment

    init_deployment(root)
    (root / "policy" / "routes.csv").write_text(
        "# demo routes: acme pays Anthropic itself (BYOK), the operator pays the rest (unified)\n"
        "p, acme, anthropic/*, acme-anthropic\n"
        + "".join(f"p, *, {p}/*, operator-{p}\n" for p in DEMO_PROVIDERS))
    sim = f"http://127.0.0.1:{sim_port}"
    (root / "tollway.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {gw_port}\n\n'
        + "".join(f'[providers.{p}]\nbase_url = "{sim}/{p}"\n\n' for p in DEMO_PROVIDERS))
    store = ControlStore(root / "control.db", Keyring(load_master_key(root)), actor="demo")
    sim_keys = {p: f"demo-{p}-{secrets.token_hex(8)}" for p in DEMO_PROVIDERS}
    for provider in DEMO_PROVIDERS:
        store.add_key(f"operator-{provider}", provider, sim_keys[provider], None)
    store.add_key("acme-anthropic", "anthropic", sim_keys["anthropic"], "acme")
    tokens = {}
    for name, tenant, user, roles in (("alice", "acme", "alice@acme.com", ["engineering"]),
                                      ("bob", "acme", "bob@acme.com", []),
                                      ("carol", "globex", "carol@globex.com", [])):
        tokens[name] = store.create_token(tenant, user, roles, None)[1]
    store.close()
    (root / "demo-simulator-keys.json").write_text(json.dumps(sim_keys))
    return tokens


def live_traffic(gw: str, tokens: dict[str, str]) -> list[str]:
    """A few real calls through the gateway, one line of outcome each."""
    chat = {"messages": [{"role": "user", "content": "Hello from the Tollway demo"}]}
    calls = [
        ("bob → openai/gpt-4o-mini (unified billing)", "/openai/v1/chat/completions",
         {"Authorization": f"Bearer {tokens['bob']}"}, {"model": "gpt-4o-mini", **chat}),
        ("alice → anthropic/claude-sonnet-4-5 (acme's own key: BYOK)", "/anthropic/v1/messages",
         {"x-api-key": tokens["alice"], "anthropic-version": "2023-06-01"},
         {"model": "claude-sonnet-4-5", "max_tokens": 50, **chat}),
        ("carol → gemini/gemini-2.5-flash (unified billing)",
         "/gemini/v1beta/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": tokens["carol"]},
         {"contents": [{"parts": [{"text": "Hello from the Tollway demo"}]}]}),
        ("bob → anthropic/claude-sonnet-4-5 (no engineering role: denied)", "/anthropic/v1/messages",
         {"x-api-key": tokens["bob"]}, {"model": "claude-sonnet-4-5", "max_tokens": 50, **chat}),
    ]
    lines = []
    with httpx.Client(base_url=gw, timeout=30) as client:
        for label, path, headers, body in calls:
            response = client.post(path, headers=headers, json=body)
            lines.append(f"{response.status_code}  {label}")
    return lines


def snippets(gw: str, token: str) -> str:
    return f"""
  Gateway   {gw}   (health: {gw}/healthz)

  curl {gw}/openai/v1/chat/completions \\
    -H "Authorization: Bearer {token}" -H 'content-type: application/json' \\
    -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Hi"}}]}}'

  python3 -c 'from openai import OpenAI; c = OpenAI(base_url="{gw}/openai/v1", api_key="{token}"); \\
print(c.chat.completions.create(model="gpt-4o-mini", messages=[{{"role":"user","content":"Hi"}}]).choices[0].message.content)'

  python3 -c 'from anthropic import Anthropic; c = Anthropic(base_url="{gw}/anthropic", api_key="{token}"); \\
print(c.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{{"role":"user","content":"Hi"}}]).content[0].text)'
"""


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    root = Path(args.keep).expanduser().resolve() if args.keep else Path(tempfile.mkdtemp(prefix="tollway-demo-"))
    sim_port, gw_port = _port(9090), _port(args.port or 8080)
    print(f"Tollway demo: preparing a deployment in {root}", file=sys.stderr)
    children: list[subprocess.Popen] = []
    try:
        tokens = prepare(root, sim_port, gw_port)
        _step("deployment created: tenants acme (BYOK) and globex (unified), 5 keys, 3 tokens")
        keys = json.loads((root / "demo-simulator-keys.json").read_text())
        children.append(subprocess.Popen(
            [sys.executable, "-m", "proxy.simulator", "--port", str(sim_port),
             *(f"--key={p}={k}" for p, k in keys.items())], stderr=subprocess.DEVNULL))
        wait_healthy(f"http://127.0.0.1:{sim_port}/_sim/health", children[-1], "simulated provider")
        _step(f"simulated OpenAI, Anthropic and Gemini on http://127.0.0.1:{sim_port}")
        log = (root / "gateway.log").open("ab")
        children.append(subprocess.Popen([sys.executable, "-m", "proxy.cli", "--data-dir", str(root), "serve"],
                                         stdout=log, stderr=subprocess.STDOUT))
        gw = f"http://127.0.0.1:{gw_port}"
        wait_healthy(f"{gw}/healthz", children[-1], "gateway")
        _step(f"gateway on {gw}")
        for line in live_traffic(gw, tokens):
            _step(line)
        print(f"\nReady in {time.monotonic() - started:.1f} s. Sample token (alice@acme.com, engineering):",
              file=sys.stderr)
        print(tokens["alice"])
        print(snippets(gw, tokens["alice"]), file=sys.stderr)
        print("Press Ctrl-C to stop.", file=sys.stderr, flush=True)
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
    except KeyboardInterrupt:
        pass
    finally:
        for child in reversed(children):
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        print(f"\nStopped. The demo's files are in {root}", file=sys.stderr)
    return 0


def register(commands, common: argparse.ArgumentParser) -> None:
    demo = commands.add_parser("demo", parents=[common], help="run a complete demo on loopback (no keys, no network)")
    demo.add_argument("--keep", metavar="DIR", help="create the deployment in DIR (kept after the demo)")
    demo.add_argument("--port", type=int, help="gateway port (default 8080, or a free one if taken)")
    demo.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")
    demo.set_defaults(func=cmd_demo)
