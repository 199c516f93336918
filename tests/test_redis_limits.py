"""Limits shared in Redis: the Lua scripts directly (all or nothing, exact money, server-time windows,
seeding once), then two real gateway processes sharing one private `redis-server`: a budget and a rate
limit hold across both, a key cool-down seen by one is honoured by the other, and Redis stopped under
load fails closed (503 in the route's format) and recovers with counters neither lost nor doubled."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest

from proxy.errors import LimitStoreUnavailable
from proxy.limits import (
    WINDOWS,
    Amounts,
    Check,
    Denied,
    Reservation,
    Scope,
    SeedRow,
    window_end,
    window_start,
)
from proxy.stores import redis_scripts
from tests.helpers import OPEN_ACCESS, SIM_KEYS, Deployment, GatewayProcess, free_port, run_cli
from tests.redis_server import RedisServer

redis = pytest.importorskip("redis")
pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

GPT_4O = (Decimal("2.50"), Decimal("10.00"))  # per million tokens, input and output
PROMPT = "spend"  # two input tokens, estimated and reported alike
TENANT = Scope("acme", None)
ALICE = Scope("acme", uuid.UUID("8f1f3a52-0000-8000-8000-000000000001"))


@pytest.fixture
async def store(redis_server):
    from proxy.stores.redis_limits import RedisLimitStore

    limit_store = RedisLimitStore(redis_server.url)
    yield limit_store
    await limit_store.close()


def _usd(input_tokens: int, output_tokens: int) -> Decimal:
    return ((input_tokens * GPT_4O[0] + output_tokens * GPT_4O[1]) / 1_000_000).quantize(Decimal("1e-9"))


def _nano(usd: str | Decimal) -> int:
    return int(Decimal(usd) * 1_000_000_000)


def _counter(client, scope: Scope, window: str, at: datetime) -> dict[str, int]:
    """A counter's used figures (u0-u2) and reserved ones (r0-r2: h0-h2, held by requests in flight)."""
    key = f"tollway:c:{scope.tenant}:{scope.user or '-'}:{WINDOWS.index(window) + 1}:{int(window_start(window, at).timestamp())}"
    raw = {k.decode(): int(v) for k, v in client.hgetall(key).items()}
    if not raw:
        return {}
    return {**{f"u{m}": raw.get(f"u{m}", 0) for m in range(3)},
            **{f"r{m}": raw.get(f"h{m}", 0) for m in range(3)}}


# --- the scripts, directly against redis ----------------------------------------------------------
async def test_reserve_is_all_or_nothing_across_every_counter(store, redis_server):
    roomy = Check(ALICE, "tokens", "hour", 1000)
    budget = Check(TENANT, "usd", "day", _nano("0.50"))
    closed = Check(TENANT, "requests", "minute", 0)
    denied = await store.reserve([roomy, budget, closed], (TENANT, ALICE), Amounts(1, 600, Decimal("0.30")),
                                 datetime.now(UTC))
    assert isinstance(denied, Denied) and denied.index == 2 and denied.used == 0
    assert 1 <= denied.retry_after_s <= 60
    assert redis_server.client().keys("tollway:c:*") == [], "a refused reservation wrote nothing"

    held = await store.reserve([roomy, budget], (TENANT, ALICE), Amounts(1, 1000, Decimal("0.50")), datetime.now(UTC))
    assert isinstance(held, Reservation), "every counter still had all of its room"
    over = await store.reserve([roomy, budget], (TENANT, ALICE), Amounts(1, 1, Decimal(0)), datetime.now(UTC))
    assert isinstance(over, Denied) and over.index == 0 and over.used == 1000
    await store.settle(held, Amounts(1, 10, Decimal("0.000000001")))
    for scope in (TENANT, ALICE):
        for window in WINDOWS:
            figures = _counter(redis_server.client(), scope, window, held.at)
            assert figures == {"u0": 1, "u1": 10, "u2": 1, "r0": 0, "r1": 0, "r2": 0}, (scope, window, figures)
            assert await store.spent(scope, "usd", window, held.at) == Decimal("0.000000001")


async def test_concurrent_reservations_never_cross_the_limit_and_money_stays_exact(store, redis_server):
    budget = [Check(TENANT, "usd", "month", _nano("1.00"))]
    cost = Decimal("0.010000001")  # 99 fit in 1.00, the 100th would cross it by 99 nano-dollars
    results = await asyncio.gather(*(store.reserve(budget, (TENANT, ALICE), Amounts(1, 0, cost), datetime.now(UTC))
                                     for _ in range(200)))
    held = [r for r in results if isinstance(r, Reservation)]
    assert len(held) == 99
    await asyncio.gather(*(store.settle(r, Amounts(1, 0, cost)) for r in held))
    figures = _counter(redis_server.client(), TENANT, "month", held[0].at)
    assert figures["u2"] == 99 * 10_000_001 and figures["r2"] == 0 and figures["u0"] == 99


EVERY_COUNTER = [Check(scope, "requests", window, 1000) for scope in (TENANT, ALICE) for window in WINDOWS]


async def test_windows_come_from_the_server_clock_and_keys_expire_after_them(store, redis_server):
    held = await store.reserve([EVERY_COUNTER[0]], (TENANT, ALICE), Amounts(1, 0, Decimal(0)),
                               datetime(2001, 1, 1, tzinfo=UTC))
    server_now = datetime.fromtimestamp(redis_server.client().time()[0], UTC)
    assert abs((held.at - server_now).total_seconds()) < 2, "the server's TIME, not the caller's `at`"
    assert held.starts == tuple(window_start(w, held.at) for w in WINDOWS), \
        "the caller's month (January 2001, from its `at`) is only a hint: the server's month is used"
    client = redis_server.client()
    assert client.keys("tollway:c:*") == [f"tollway:c:acme:-:1:{int(held.starts[0].timestamp())}".encode()], \
        "a reservation holds only the counters a limit checks"
    await store.settle(held, Amounts(1, 0, Decimal(0)))
    for scope in (TENANT, ALICE):
        for window, start in zip(WINDOWS, held.starts, strict=True):
            key = f"tollway:c:acme:{scope.user or '-'}:{WINDOWS.index(window) + 1}:{int(start.timestamp())}"
            left = client.ttl(key)
            expected = (window_end(window, start) - server_now).total_seconds() + 120
            assert 0 < left <= expected + 1 and left >= expected - 3, (scope, window, left, expected)


async def test_a_counter_created_again_by_a_late_settle_or_release_still_expires(store, redis_server):
    """EXPIREAT is set only when a script creates a counter: a settle or release arriving after its
    counters expired (a request longer than its minute window plus the grace) creates them again, with
    their expiry."""
    client = redis_server.client()
    for finish in ("settle", "release"):
        held = await store.reserve(EVERY_COUNTER, (TENANT, ALICE), Amounts(1, 50, Decimal("0.001")), datetime.now(UTC))
        keys = client.keys("tollway:c:*")
        assert len(keys) == 8 and all(client.ttl(k) > 0 for k in keys)
        client.delete(*keys)  # expired meanwhile
        if finish == "settle":
            await store.settle(held, Amounts(1, 40, Decimal("0.0008")))
        else:
            await store.release(held)
        keys = client.keys("tollway:c:*")
        assert len(keys) == 8, finish
        assert all(client.ttl(k) > 0 for k in keys), (finish, {k: client.ttl(k) for k in keys})
        client.delete(*keys)


@pytest.mark.parametrize("at", [
    datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC),
    datetime(2025, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC),
    datetime(2100, 2, 28, 12, tzinfo=UTC), datetime(2000, 2, 29, 1, tzinfo=UTC), datetime(2025, 6, 15, 12, 34, 56, tzinfo=UTC),
])
def test_the_scripts_calendar_windows_match_the_memory_stores(redis_server, at):
    probe = redis_server.client().register_script(
        redis_scripts._WINDOWS + "local s, e = windows(tonumber(ARGV[1])) return {s[1], s[2], s[3], s[4], e[1], e[2], "
        "e[3], e[4], window_end(1, s[1]), window_end(2, s[2]), window_end(3, s[3]), window_end(4, s[4])}")
    got = [datetime.fromtimestamp(v, UTC) for v in probe(args=[int(at.timestamp())])]
    starts = [window_start(w, at) for w in WINDOWS]
    ends = [window_end(w, s) for w, s in zip(WINDOWS, starts, strict=True)]
    assert got == starts + ends + ends, "settle's window_end(w, start) agrees with reserve's windows(now)"


async def test_seeding_happens_once_per_source_and_again_only_when_redis_lost_everything(store, redis_server):
    now = datetime.now(UTC)
    rows = [SeedRow(TENANT, "month", window_start("month", now), 3, 30, _nano("0.75"))]
    assert await store.seed("events-a", rows) is True
    assert await store.seed("events-a", rows) is False, "a second seed of the same events is refused"
    assert await store.seed("events-b", rows) is True, "another gateway's events count too"
    assert await store.spent(TENANT, "usd", "month", now) == Decimal("1.50")

    calls = []

    async def reseed() -> None:
        calls.append(1)
        await asyncio.sleep(0.05)  # reading events takes a while: concurrent requests wait for it
        await store.seed("events-a", rows)

    store.attach("events-a", reseed)
    held = await store.reserve([Check(TENANT, "usd", "month", _nano("2.00"))], (TENANT, ALICE),
                               Amounts(1, 0, Decimal("0.25")), now)
    assert isinstance(held, Reservation) and calls == [], "seeded already: no re-seed"
    redis_server.client().flushall()  # Redis lost its data
    budget = [Check(TENANT, "usd", "month", _nano("1.00"))]
    results = await asyncio.gather(*(store.reserve(budget, (TENANT, ALICE), Amounts(1, 0, Decimal("0.10")), now)
                                     for _ in range(5)))
    assert calls == [1], "one re-seed, however many requests found the store empty"
    assert sum(isinstance(r, Reservation) for r in results) == 2, "0.75 seeded + 2 x 0.10 fit in 1.00"
    # the reservation from before the loss settles its real figures, not a release of what was lost
    await store.settle(held, Amounts(1, 0, Decimal("0.05")))
    figures = _counter(redis_server.client(), TENANT, "month", now)
    assert figures["u2"] == _nano("0.80") and figures["r2"] == _nano("0.20"), figures


async def test_alerts_are_sent_once_whichever_process_crosses_first(store, redis_server):
    from proxy.stores.redis_limits import RedisLimitStore

    other = RedisLimitStore(redis_server.url)
    try:
        until = datetime.now(UTC) + timedelta(days=1)
        answers = await asyncio.gather(*(s.first_alert("3:acme:-:month:0:80", until) for s in (store, other) * 5))
        assert sorted(answers) == [False] * 9 + [True]
    finally:
        await other.close()


async def test_an_unreachable_redis_refuses_with_limit_store_unavailable():
    from proxy.stores.redis_limits import RedisLimitStore

    dead = RedisLimitStore(f"redis://127.0.0.1:{free_port()}/0")
    try:
        started = time.monotonic()
        with pytest.raises(LimitStoreUnavailable) as caught:
            await dead.reserve([], (TENANT, ALICE), Amounts(1, 0, Decimal(0)), datetime.now(UTC))
        assert time.monotonic() - started < 2, "fails fast"
        assert caught.value.status == 503 and caught.value.code == "limit_store_unavailable"
        assert (await dead.check()).startswith("redis ")
    finally:
        await dead.close()


# --- two gateway processes sharing one Redis ------------------------------------------------------
def _pair(deployment: Deployment, redis_server: RedisServer, limits: str, routes: str | None = None):
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n" + limits)
    if routes is not None:
        (deployment.path / "policy" / "routes.csv").write_text(routes)
    twin = deployment.twin(deployment.path.parent / "twin")
    extra = f'\n[limits]\nstore = "{redis_server.url}"\n'
    for dep in (deployment, twin):
        dep.write_toml(extra)
    return GatewayProcess(deployment).start(), GatewayProcess(twin).start()


def _stop(*gateways: GatewayProcess) -> list[dict]:
    for gw in gateways:
        assert gw.stop() == 0, gw.log()
    return [row for gw in gateways for row in gw.deployment.events()]


def _fresh_window(window: str, needed_s: float) -> None:
    now = datetime.now(UTC)
    left = (window_end(window, window_start(window, now)) - now).total_seconds()
    if left < needed_s:
        time.sleep(left + 0.1)


def _chat(gw: GatewayProcess, body: dict | None = None, headers: dict | None = None) -> tuple[str, dict, dict]:
    body = body or {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT}]}
    return (gw.url + "/openai/v1/chat/completions", body,
            {"authorization": f"Bearer {gw.deployment.tokens['bob']}", **(headers or {})})


async def _burst(gateways: list[GatewayProcess], n: int, body: dict | None = None,
                 headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n + 10)) as http:
        calls = [_chat(gateways[i % len(gateways)], body, headers) for i in range(n)]
        return await asyncio.gather(*(http.post(url, json=b, headers=h) for url, b, h in calls))


async def test_two_gateways_never_spend_more_than_a_shared_1_usd_budget(deployment, sim, redis_server):
    _fresh_window("month", 60)
    a, b = _pair(deployment, redis_server, "acme,tenant,usd,month,1.00\n")
    max_tokens, output_tokens = 4000, 3000
    reserved_each, spent_each = _usd(2, max_tokens), _usd(2, output_tokens)  # 0.040005 and 0.030005
    assert (reserved_each, spent_each) == (Decimal("0.040005"), Decimal("0.030005"))
    body = {"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPT}]}
    try:
        responses = await _burst([a, b], 200, body, {"x-sim-latency-ms": "400",
                                                     "x-sim-output-tokens": str(output_tokens)})
        ok = [r for r in responses if r.status_code == 200]
        assert len(ok) + sum(r.status_code == 429 for r in responses) == 200, {r.status_code for r in responses}
        # one gateway alone would admit 24-33; two with counters of their own, twice that
        assert 24 <= len(ok) <= 33, f"{len(ok)} admitted across both gateways"
    finally:
        rows = _stop(a, b)
    admitted = [e for e in rows if e["outcome"] == "ok"]
    assert len(rows) == 200 and len(admitted) == len(ok)
    assert all(e["cost_usd"] == spent_each for e in admitted)
    spent = sum(e["cost_usd"] for e in admitted)
    assert spent <= Decimal("1.00"), f"spent {spent} of a 1.00 USD budget across two gateways"
    figures = _counter(redis_server.client(), TENANT, "month", datetime.now(UTC))
    assert figures["u2"] == _nano(spent) and figures["r2"] == 0 and figures["u0"] == len(ok), figures


async def test_a_10_requests_a_minute_limit_admits_exactly_10_of_50_across_two_gateways(deployment, sim, redis_server):
    a, b = _pair(deployment, redis_server, "acme,tenant,requests,minute,10\n")
    try:
        _fresh_window("minute", 10)  # the burst (about a second) inside one minute window
        responses = await _burst([a, b], 50, headers={"x-sim-latency-ms": "200"})
        assert sorted(r.status_code for r in responses) == [200] * 10 + [429] * 40
        refused = next(r for r in responses if r.status_code == 429)
        assert "10 requests per minute" in refused.json()["error"]["message"]
        assert {r.url.port for r in responses if r.status_code == 200} <= {a.deployment.port, b.deployment.port}
        # /metrics: each request waited for one reserve, each admitted one for a settle, on one gateway or the other
        deadline = time.monotonic() + 5
        while (calls := await _store_calls([a, b])) != {"reserve": 50, "settle": 10}:
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(0.05)
    finally:
        _stop(a, b)


async def _store_calls(gateways: list[GatewayProcess]) -> dict[str, int]:
    """`tollway_limit_store_seconds_count` by call, summed over the gateways' /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    calls: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for gw in gateways:
            text = (await http.get(gw.url + "/metrics")).text
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == "tollway_limit_store_seconds_count":
                        calls[sample.labels["call"]] = calls.get(sample.labels["call"], 0) + int(sample.value)
    return calls


def test_a_key_cooling_down_after_a_429_on_one_gateway_is_honoured_by_the_other(deployment, sim, redis_server):
    deployment.add_key("openai-1", "openai", SIM_KEYS["openai"])
    a, b = _pair(deployment, redis_server, "", routes="p, *, openai/*, openai-1\n")
    try:
        with httpx.Client(timeout=10) as http:
            url, body, headers = _chat(a, headers={"x-sim-fault": "status:429"})
            limited = http.post(url, json=body, headers=headers)
            assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
            assert len(sim.requests) == 1
            time.sleep(0.1)  # published by a, delivered to b
            url, body, headers = _chat(b)
            cooling = http.post(url, json=body, headers=headers)
            assert cooling.status_code == 429 and "cooling down" in cooling.json()["error"]["message"], cooling.text
            assert len(sim.requests) == 1, "the other gateway did not call the provider with the resting key"
            time.sleep(1.1)
            assert http.post(url, json=body, headers=headers).status_code == 200
            assert len(sim.requests) == 2
    finally:
        _stop(a, b)


async def _load(gateways: list[GatewayProcess], stop: asyncio.Event, seen: list[tuple[float, int, dict]]) -> None:
    """Steady traffic over both gateways until `stop` (bounded: at most 4,000 requests)."""
    async with httpx.AsyncClient(timeout=10) as http:
        for i in range(4000):
            if stop.is_set():
                return
            url, body, headers = _chat(gateways[i % 2])
            response = await http.post(url, json=body, headers=headers)
            seen.append((time.monotonic(), response.status_code, response.json()))


async def test_redis_stopped_under_load_fails_closed_and_recovers_with_counters_right(deployment, sim, redis_server):
    _fresh_window("day", 120)
    a, b = _pair(deployment, redis_server, "acme,tenant,requests,day,100000\n")
    seen: list[tuple[float, int, dict]] = []
    stop = asyncio.Event()
    try:
        loaders = [asyncio.create_task(_load([a, b], stop, seen)) for _ in range(4)]
        await asyncio.sleep(1.0)
        redis_server.stop()
        stopped_at = time.monotonic()
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(timeout=10) as http:
            ready = await http.get(a.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["limits"].startswith("redis "), ready.text
        redis_server.start()
        restarted_at = time.monotonic()
        await asyncio.sleep(1.5)
        stop.set()
        await asyncio.gather(*loaders)
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(b.url + "/readyz")).status_code == 200
    finally:
        stop.set()
        rows = _stop(a, b)
    before = [s for t, s, _ in seen if t < stopped_at]
    during = [(s, body) for t, s, body in seen if stopped_at + 0.2 < t < restarted_at]
    after = [s for t, s, _ in seen if t > restarted_at + 0.5]
    assert before and set(before) == {200}
    assert during and all(s == 503 for s, _ in during), {s for s, _ in during}
    error = during[0][1]["error"]
    assert error["code"] == "limit_store_unavailable" and "Redis" in error["message"], error
    assert after and set(after) == {200}, "requests succeed again once Redis is back"

    refused = [e for e in rows if e["status_code"] == 503]
    assert refused and all(e["outcome"] == "upstream_error" and e["key_id"] is None for e in refused)
    admitted = [e for e in rows if e["status_code"] == 200]
    assert len(admitted) == sum(1 for _, s, _ in seen if s == 200)
    # Redis came back empty: each gateway put its own events back once, and counted the rest live
    client = redis_server.client()
    assert len(client.keys("tollway:seeded:*")) == 2
    figures = _counter(client, TENANT, "day", datetime.now(UTC))
    assert figures["u0"] == len(admitted) and figures["r0"] == 0, (figures, len(admitted))

    restarted = GatewayProcess(a.deployment).start()  # a gateway restart with Redis up seeds nothing again
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            url, body, headers = _chat(restarted)
            assert (await http.post(url, json=body, headers=headers)).status_code == 200
    finally:
        _stop(restarted)
    assert _counter(client, TENANT, "day", datetime.now(UTC))["u0"] == len(admitted) + 1


async def test_a_re_seed_that_cannot_read_the_events_refuses_with_503_then_recovers(deployment, sim, redis_server):
    """Redis lost its counters and the events cannot be read back (here: the segments directory turned into a
    file): requests are refused with 503 `limit_store_unavailable` in the route's format, never a 500, and
    /readyz says why; once the events can be read, the next request re-seeds and every request counts."""
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n"
                                                           "acme,tenant,requests,day,1000\n")
    deployment.write_toml(extra=f'sink = "segments"\n\n[limits]\nstore = "{redis_server.url}"\n')
    segments = deployment.path / "segments"
    gw = GatewayProcess(deployment).start()
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            url, body, headers = _chat(gw)
            assert (await http.post(url, json=body, headers=headers)).status_code == 200
            deadline = time.monotonic() + 10
            while not list(segments.glob("*.parquet")):  # sealed within flush_interval_ms
                assert time.monotonic() < deadline, "the first event was never sealed"
                await asyncio.sleep(0.05)
            redis_server.client().flushall()
            aside = segments.with_name("segments-aside")
            segments.rename(aside)
            segments.write_text("")  # listing the segments now fails
            refused = [await http.post(url, json=body, headers=headers) for _ in range(3)]
            assert [r.status_code for r in refused] == [503] * 3
            error = refused[0].json()["error"]
            assert error["code"] == "limit_store_unavailable" and "lost its counters" in error["message"], error
            ready = await http.get(gw.url + "/readyz")
            assert ready.status_code == 503 and "re-seeding them from the events failed" in ready.json()["checks"]["limits"]
            segments.unlink()
            aside.rename(segments)
            await asyncio.sleep(1.1)  # past the pause after a failed re-seed
            assert (await http.post(url, json=body, headers=headers)).status_code == 200
            assert (await http.get(gw.url + "/readyz")).status_code == 200
    finally:
        assert gw.stop() == 0, gw.log()
    assert run_cli(deployment.path, "pipeline", "run", "--once").returncode == 0
    rows = deployment.events()
    admitted = [e for e in rows if e["status_code"] == 200]
    assert len(admitted) == 2 and sum(e["status_code"] == 503 for e in rows) == 3
    figures = _counter(redis_server.client(), TENANT, "day", datetime.now(UTC))
    assert figures["u0"] == 2, "re-seeded with the first request, then counted the second"


def test_a_gateway_reaches_redis_over_tls_with_a_private_ca_and_a_client_certificate(deployment, sim, tmp_path):
    """`[limits] store = "rediss://…?ssl_ca_certs=…&ssl_certfile=…&ssl_keyfile=…"`: limits and key health both
    go over TLS to a server that only speaks TLS and asks for a client certificate."""
    server = RedisServer(tmp_path / "redis-tls", tls=True, client_certs=True).start()
    tls = server.tls
    url = f"{server.url}?ssl_ca_certs={tls.ca}&ssl_certfile={tls.client_cert}&ssl_keyfile={tls.client_key}"
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n"
                                                           "acme,tenant,requests,day,1000\n")
    deployment.write_toml(f'\n[limits]\nstore = "{url}"\n')
    gw = GatewayProcess(deployment).start()
    try:
        url_, body, headers = _chat(gw)
        assert [httpx.post(url_, json=body, headers=headers, timeout=15).status_code for _ in range(3)] == [200] * 3
        ready = httpx.get(gw.url + "/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["checks"]["limits"] == "ok", ready.text
        assert _counter(server.client(), TENANT, "day", datetime.now(UTC))["u0"] == 3
        deadline = time.monotonic() + 5  # key health (redis-py, the same URL) subscribed over TLS too
        while dict(server.client().pubsub_numsub("tollway:keys")).get(b"tollway:keys", 0) < 1:
            assert time.monotonic() < deadline, "key health never subscribed"
            time.sleep(0.05)
    finally:
        assert gw.stop() == 0, gw.log()
        server.stop()
    assert "Traceback" not in gw.log() and "ERROR" not in gw.log(), gw.log()


async def test_a_redis_that_may_evict_counters_is_named_at_start(deployment, sim, tmp_path):
    """`maxmemory` with an evicting policy (several managed services' default) could silently forget usage:
    the store says so, and the gateway logs it at start; the default (`noeviction`) says nothing."""
    from proxy.stores.redis_limits import RedisLimitStore

    evicting = RedisServer(tmp_path / "evicting", config=("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")).start()
    plain = RedisServer(tmp_path / "plain").start()
    try:
        advice = {}
        for name, server in (("evicting", evicting), ("plain", plain)):
            store = RedisLimitStore(server.url)
            advice[name] = await store.advice()
            await store.close()
        assert advice["plain"] == []
        (said,) = advice["evicting"]
        assert "maxmemory-policy allkeys-lru" in said and "set maxmemory-policy noeviction" in said.lower(), said
        deployment.write_toml(f'\n[limits]\nstore = "{evicting.url}"\n')
        gw = GatewayProcess(deployment).start()
        try:
            ready = httpx.get(gw.url + "/readyz", timeout=5)
            assert ready.status_code == 200, "advice, not a failed check: the gateway serves"
            assert ready.json()["advice"] == [said]
            shown = run_cli(None, "status", gw.url)
            assert shown.returncode == 0 and f"advice: {said}" in shown.stdout, shown.stdout + shown.stderr
            (gateway,) = json.loads(run_cli(None, "status", "--json", gw.url).stdout)["gateways"]
            assert gateway["advice"] == [said]
        finally:
            assert gw.stop() == 0
        assert "WARNING" in gw.log() and "maxmemory-policy allkeys-lru" in gw.log(), gw.log()
    finally:
        evicting.stop()
        plain.stop()


async def test_behind_sentinel_a_failover_is_ridden_out_with_the_counters_kept(deployment, sim, tmp_path):
    """`[limits] store = "redis+sentinel://…/tw"`: the gateway asks Sentinel for the master. The master is
    killed: requests are refused with 503 (fail closed) until Sentinel promotes the replica, then served
    again by the new master, which holds the counters replicated before the loss."""
    from tests.redis_server import SentinelSet

    redis_set = SentinelSet(tmp_path / "sentinel").start()
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n"
                                                           "acme,tenant,requests,day,1000\n")
    deployment.write_toml(f'\n[limits]\nstore = "{redis_set.url}"\n')
    gw = GatewayProcess(deployment).start()
    statuses: list[int] = []
    try:
        async with httpx.AsyncClient(timeout=15) as http:
            url, body, headers = _chat(gw)
            before = [(await http.post(url, json=body, headers=headers)).status_code for _ in range(3)]
            assert before == [200] * 3
            replica = redis_set.replica.client()
            deadline = time.monotonic() + 5
            while _counter(replica, TENANT, "day", datetime.now(UTC)).get("u0") != 3:  # replicated
                assert time.monotonic() < deadline, "the replica never got the counters"
                await asyncio.sleep(0.05)
            redis_set.master.proc.kill()
            redis_set.master.proc.wait()
            deadline = time.monotonic() + 30
            while not statuses or statuses[-1] != 200:
                assert time.monotonic() < deadline, f"never served again after the failover: {statuses[-5:]}"
                response = await http.post(url, json=body, headers=headers)
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert response.json()["error"]["code"] == "limit_store_unavailable", response.text
                await asyncio.sleep(0.1)
            assert redis_set.master_port() == redis_set.replica.port, "Sentinel promoted the replica"
            after = [(await http.post(url, json=body, headers=headers)).status_code for _ in range(2)]
            assert after == [200, 200]
            assert (await http.get(gw.url + "/readyz")).status_code == 200
            deadline = time.monotonic() + 15  # key health (redis-py, through Sentinel) subscribed to the new master
            while dict(replica.pubsub_numsub("tollway:keys")).get(b"tollway:keys", 0) < 1:
                assert time.monotonic() < deadline, "key health never subscribed to the new master"
                await asyncio.sleep(0.1)
    except BaseException:
        redis_set.stop()
        raise
    finally:
        assert gw.stop() == 0, gw.log()
    assert set(statuses[:-1]) <= {503}, statuses
    try:
        figures = _counter(redis_set.replica.client(), TENANT, "day", datetime.now(UTC))
        assert figures["u0"] == 3 + 1 + 2, f"the counters from before the loss and after it: {figures}"
    finally:
        redis_set.stop()
