"""Two machines behind a load balancer, and one of them dies.

Two `tollway serve` processes with separate deployment directories (as two machines have), sharing
what a company's gateways share: Redis (limits), PostgreSQL (keys, tokens, audit) and an
S3-compatible store (event segments), behind HAProxy (or a small TCP balancer when it is not
installed). Under load, one gateway gets SIGKILL: clients that retry (the OpenAI SDK's own
retries) see no error; that machine comes back and seals what its killed process had spooled;
budgets hold exactly across both; after the pipeline, every answered request has exactly one
event; a token revoked on one machine is refused by the other within a second.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from proxy.control import ControlStore
from proxy.crypto import Keyring, load_master_key
from tests.balancer import Balancer
from tests.helpers import OPEN_ACCESS, Deployment, GatewayProcess, refused_after, run_cli
from tests.pg_server import PgServer, unavailable_reason
from tests.redis_server import RedisServer
from tests.s3_server import S3Server

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or ""),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]
REQUEST_ID = "x-tollway-request-id"
BUCKET = "tollway-events"
#: gpt-4o: $2.50 in, $10.00 out per million tokens; the simulator answers "spend" with 2 input tokens
#: and the output tokens the test asks for.
OUTPUT_TOKENS = 3000
COST_EACH = (2 * Decimal("2.50") + OUTPUT_TOKENS * Decimal("10.00")) / 1_000_000  # 0.030005


class Machine(Deployment):
    """One machine's deployment directory: its own events spool and port, the shared services in tollway.toml."""

    def __init__(self, path: Path, sim_url: str, shared: str, control_url: str) -> None:
        self.shared, self.control_url = shared + f'\n[control]\nurl = "{control_url}"\n', control_url
        super().__init__(path, sim_url)
        (path / "control.db").unlink()  # `init` made one; the control store is PostgreSQL

    def write_toml(self, extra: str = "", providers: dict[str, str] | None = None) -> None:
        super().write_toml(self.shared + extra, providers)

    def store(self) -> ControlStore:
        return ControlStore(self.control_url, Keyring(load_master_key(self.path)))


@pytest.fixture
def services(tmp_path, monkeypatch):
    redis_server = RedisServer(tmp_path / "redis").start()
    pg, s3 = PgServer().start(), S3Server().start()
    try:
        s3.create_bucket(BUCKET)
        for name, value in s3.env.items():  # the gateways and the pipeline inherit the environment
            monkeypatch.setenv(name, value)
        yield redis_server, pg, s3
    finally:
        s3.stop()
        pg.close()
        redis_server.stop()


def two_machines(tmp_path: Path, sim_url: str, services) -> tuple[Machine, Machine]:
    redis_server, pg, _ = services
    shared = (f'sink = "segments"\nsegments_dir = "s3://{BUCKET}/events"\n'
              f'\n[limits]\nstore = "{redis_server.url}"\n')
    a = Machine(tmp_path / "machine-a", sim_url, shared, pg.create_database())
    a.add_test_keys()
    a.issue_token("alice", "acme", "alice@acme.com", ("engineering",))
    a.issue_token("carol", "globex", "carol@globex.com")
    a.issue_token("erin", "globex", "erin@globex.com")
    (a.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (a.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\nglobex,tenant,usd,month,1.00\n")
    b = a.twin(tmp_path / "machine-b")
    b.write_toml()
    return a, b


async def load(url: str, token: str, seconds: float, concurrency: int, kill_at: float, kill) -> tuple[list, list]:
    """`concurrency` SDK clients in a loop for `seconds` through the balancer; `kill()` at `kill_at`."""
    client = openai.AsyncOpenAI(base_url=f"{url}/openai/v1", api_key=token, max_retries=6, timeout=20)
    answered, errors = [], []
    deadline = time.monotonic() + seconds

    async def one_client() -> None:
        while time.monotonic() < deadline:
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
                answered.append(raw.headers[REQUEST_ID])
            except openai.APIError as exc:
                errors.append(repr(exc))

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        await asyncio.to_thread(kill)

    await asyncio.gather(killer(), *(one_client() for _ in range(concurrency)))
    await client.close()
    return answered, errors


async def burst(url: str, token: str, n: int) -> list[httpx.Response]:
    body = {"model": "gpt-4o", "max_tokens": 4000, "messages": [{"role": "user", "content": "spend"}]}
    headers = {"authorization": f"Bearer {token}", "x-sim-latency-ms": "300", "x-sim-output-tokens": str(OUTPUT_TOKENS)}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 10)) as http:
        return await asyncio.gather(*(http.post(f"{url}/openai/v1/chat/completions", json=body, headers=headers)
                                      for _ in range(n)))


async def test_two_machines_behind_a_balancer_survive_losing_one(tmp_path, simulator, services):
    a, b = two_machines(tmp_path, simulator.url, services)
    gw_a, gw_b = GatewayProcess(a).start(), GatewayProcess(b).start()
    balancer = Balancer([a.port, b.port], tmp_path)
    pids = {gw_a.proc.pid, gw_b.proc.pid}
    answered: list[str] = []
    try:
        # 1. Load through the balancer; machine b's process is killed 1.5 s in.
        ok, errors = await load(balancer.url, a.tokens["alice"], seconds=4.0, concurrency=8, kill_at=1.5,
                                kill=lambda: gw_b.stop(signal.SIGKILL))
        assert errors == [], f"clients that retry saw errors ({balancer.kind}): {errors[:3]}"
        assert len(ok) > 50, f"only {len(ok)} requests answered in 4 s"
        answered += ok
        spooled = list((b.path / "spool").glob("*.spool"))
        # 2. Machine b comes back: its new process seals what the killed one had spooled.
        gw_b = GatewayProcess(b).start()
        assert not [p for p in spooled if p.exists()], "the restarted gateway adopted and sealed the spool"

        # 3. A $1.00 monthly budget shared by both machines: 100 concurrent requests never spend more.
        responses = await burst(balancer.url, a.tokens["carol"], 100)
        assert {r.status_code for r in responses} <= {200, 429}, {r.status_code for r in responses}
        admitted = [r for r in responses if r.status_code == 200]
        answered += [r.headers[REQUEST_ID] for r in responses]
        assert 24 <= len(admitted) <= 33, f"{len(admitted)} admitted of a budget for 33"

        # 4. A token revoked through machine a's CLI is refused by machine b within a second.
        token_id = next(t["id"] for t in _tokens(a) if t["user"] == "erin@globex.com")
        assert httpx.get(f"{gw_b.url}/openai/v1/models", headers={
            "authorization": f"Bearer {a.tokens['erin']}"}).status_code == 200
        revoked = run_cli(a.path, "tokens", "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        took = refused_after(gw_b, a.tokens["erin"], 1.0)
        assert took < 1.0, f"{gw_b.url} still accepted a token revoked 1 s ago"
        print(f"{balancer.kind}: {len(ok)} answered in 4 s at c=8 through the kill; revocation refused after "
              f"{took * 1000:.0f} ms; {len(admitted)} admitted under the budget")
    finally:
        balancer.close()
        codes = [gw.stop() for gw in (gw_a, gw_b)]
    assert codes == [0, 0], gw_a.log() + gw_b.log()

    done = run_cli(a.path, "pipeline", "run", "--once", "--json")
    assert done.returncode == 0, done.stderr
    sealed_by = {key.rsplit("-", 2)[-2] for key in services[2].keys(BUCKET, "events/ingested/")}
    assert {str(pid) for pid in pids} <= sealed_by, "both machines served and sealed segments before the kill"
    events = a.events()
    recorded = Counter(str(e["event_id"]) for e in events)
    assert max(recorded.values()) == 1, "an event recorded twice"
    assert set(answered) <= set(recorded), f"{len(set(answered) - set(recorded))} answered requests without an event"
    # Beyond the answered: only requests the kill cut off after b recorded them (their clients retried).
    unanswered = [e for e in events if str(e["event_id"]) not in set(answered) and e["endpoint"] != "openai/models.list"]
    assert len(unanswered) <= 8, unanswered
    budget_events = [e for e in events if e["tenant"] == "globex" and e["outcome"] == "ok"
                     and e["endpoint"] == "openai/chat.completions.create"]
    spent = sum(e["cost_usd"] for e in budget_events)
    assert all(e["cost_usd"] == COST_EACH for e in budget_events)
    assert len(budget_events) == len(admitted) and spent <= Decimal("1.00"), f"spent {spent} of 1.00"


def _tokens(machine: Machine) -> list[dict]:
    listed = run_cli(machine.path, "tokens", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)
