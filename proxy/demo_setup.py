"""What `tollway demo` sets up: a deployment from the samples pointed at the simulated providers,
keys, tokens, limits, a month of history, and a little live traffic through the real gateway.

The sample policy (`data/policy/*.csv`) decides everything: acme pays Anthropic itself (BYOK) and
uses the operator's OpenAI key (unified billing); globex is on unified billing with prepaid credits;
bob has no engineering role, so his Claude calls are denied.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import httpx

from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key
from proxy.history import Workload

PROVIDERS = ("openai", "anthropic", "gemini")
USERS = {  # token name -> (tenant, user id, roles)
    "alice": ("acme", "alice@acme.com", ("engineering",)),
    "bob": ("acme", "bob@acme.com", ()),
    "carol": ("globex", "carol@globex.com", ()),
}
WORKLOADS = [
    Workload("acme", (("alice@acme.com", ("engineering",)), ("bob@acme.com", ()), ("dan@acme.com", ("engineering",)),
                      ("eve@acme.com", ("engineering",))),
             (("anthropic/claude-sonnet-4-5", 5), ("anthropic/claude-haiku-4-5", 2), ("openai/gpt-4o-mini", 3)), 160),
    Workload("globex", (("carol@globex.com", ()), ("frank@globex.com", ()), ("grace@globex.com", ())),
             (("openai/gpt-4.1", 3), ("openai/gpt-4o-mini", 2), ("gemini/gemini-2.5-flash", 4),
              ("gemini/gemini-2.5-pro", 1)), 140),
]
GLOBEX_CREDITS = Decimal("25")
BUDGET_SHARE = Decimal("0.85")  # globex's monthly budget is set so that it stands at ~85 %
BOB_PER_MINUTE = 3


def prepare(root: Path, sim_url: str, gw_port: int) -> tuple[dict[str, str], dict[str, str]]:
    """The deployment: samples, simulator URLs, one key per provider (plus acme's own Anthropic key),
    a token per demo user, globex's credits. Returns the tokens by user name and the made-up provider
    keys the simulator must accept (kept only in memory and in control.db, encrypted)."""
    from proxy.cli import init_deployment

    init_deployment(root)
    (root / "policy" / "routes.csv").write_text(
        "# demo routes: acme pays Anthropic itself (BYOK), the operator pays the rest (unified)\n"
        "p, acme, anthropic/*, acme-anthropic\n"
        + "".join(f"p, *, {p}/*, operator-{p}\n" for p in PROVIDERS))
    (root / "tollway.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {gw_port}\n\n'
        + "".join(f'[providers.{p}]\nbase_url = "{sim_url}/{p}"\n\n' for p in PROVIDERS)
        + "[pipeline]\nreport_interval_s = 30\n")
    store = ControlStore(root / "control.db", Keyring(load_master_key(root)), actor="demo")
    try:
        sim_keys = {p: f"demo-{p}-{secrets.token_hex(8)}" for p in PROVIDERS}
        for provider in PROVIDERS:
            store.add_key(f"operator-{provider}", provider, sim_keys[provider], None)
        store.add_key("acme-anthropic", "anthropic", sim_keys["anthropic"], "acme")
        tokens = {name: store.create_token(tenant, user, list(roles), None)[1]
                  for name, (tenant, user, roles) in USERS.items()}
        store.add_credits("globex", GLOBEX_CREDITS, "demo: prepaid credits")
    finally:
        store.close()
    return tokens, sim_keys


def write_limits(root: Path, now: datetime | None = None) -> Decimal:
    """limits.csv for the demo: the samples, a per-minute cap on bob, and a monthly budget for globex
    set just above what its history has spent this month (so it stands near its limit)."""
    month_start = (now or datetime.now(UTC)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    con = duckdb.connect(str(root / "events.duckdb"), read_only=True)
    try:
        spent = con.execute("SELECT coalesce(sum(cost_usd), 0) FROM events WHERE tenant = 'globex' AND ts >= ?",
                            [month_start]).fetchone()[0]
    finally:
        con.close()
    budget = Decimal(max(1, math.ceil(Decimal(spent) / BUDGET_SHARE)))
    with (root / "policy" / "limits.csv").open("a") as out:
        out.write(f"# demo: bob may send {BOB_PER_MINUTE} requests a minute; globex's budget is near its limit\n"
                  f"acme,bob@acme.com,requests,minute,{BOB_PER_MINUTE}\nglobex,tenant,usd,month,{budget}\n")
    return budget


@dataclass(frozen=True)
class Call:
    label: str
    token: str  # a USERS name
    path: str
    body: dict
    stream: bool = False


CHAT = [{"role": "user", "content": "Say hello to the Tollway demo in one sentence."}]
LIVE_CALLS = [
    Call("bob → openai/gpt-4o-mini (operator key: unified billing)", "bob", "/openai/v1/chat/completions",
         {"model": "gpt-4o-mini", "messages": CHAT}),
    Call("alice → anthropic/claude-sonnet-4-5, streamed (acme's own key: BYOK)", "alice", "/anthropic/v1/messages",
         {"model": "claude-sonnet-4-5", "max_tokens": 200, "messages": CHAT, "stream": True}, stream=True),
    Call("carol → gemini/gemini-2.5-flash (unified)", "carol",
         "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
         {"contents": [{"parts": [{"text": CHAT[0]["content"]}]}]}),
    Call("carol → openai/gpt-4.1, streamed (unified)", "carol", "/openai/v1/chat/completions",
         {"model": "gpt-4.1", "messages": CHAT, "stream": True}, stream=True),
    Call("bob → anthropic/claude-sonnet-4-5 (no engineering role: denied by policy)", "bob",
         "/anthropic/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": CHAT}),
    *[Call(f"bob → openai/gpt-4o-mini, call {n} of 4 (bob may send {BOB_PER_MINUTE} a minute)", "bob",
           "/openai/v1/chat/completions", {"model": "gpt-4o-mini", "messages": CHAT}) for n in (2, 3, 4)],
]
#: The scripted calls must show what their labels say, so the simulator's random faults are off for them.
SCRIPTED = {"x-sim-latency-ms": "120", "x-sim-chunk-delay-ms": "25"}


def credential_headers(path: str, token: str) -> dict[str, str]:
    if path.startswith("/anthropic/"):
        return {"x-api-key": token, "anthropic-version": "2023-06-01"}
    if path.startswith("/gemini/"):
        return {"x-goog-api-key": token}
    return {"Authorization": f"Bearer {token}"}


def live_traffic(gw: str, tokens: dict[str, str]) -> list[str]:
    """The live calls through the real gateway, one line of outcome each."""
    _clear_of_the_minutes_end()
    lines = []
    with httpx.Client(base_url=gw, timeout=60) as client:
        for call in LIVE_CALLS:
            request = client.build_request("POST", call.path, json=call.body,
                                           headers={**credential_headers(call.path, tokens[call.token]), **SCRIPTED})
            response = client.send(request, stream=call.stream)
            chunks = sum(1 for _ in response.iter_raw()) if call.stream else 0
            response.close()
            shown = f"{response.status_code}" + (f" ({chunks} chunks)" if chunks else "")
            lines.append(f"{shown:14} {call.label}")
    return lines


def _clear_of_the_minutes_end(margin_s: float = 10.0) -> None:
    """Bob's fourth call must meet his per-minute limit: start the calls (a second or two in all) where the
    minute cannot roll over between his first and his fourth, or the limit would count afresh."""
    now = datetime.now(UTC)
    left = 60 - (now.second + now.microsecond / 1e6)
    if left < margin_s:
        time.sleep(left + 0.05)
