"""Rate limits and budgets through a real `tollway serve` and the simulated providers: each metric, window
and subject, refusals in every provider format, no overshoot under concurrency, streams that settle,
counters that survive a restart, and budget alerts."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import openai
import pytest

from proxy.limits import window_end, window_start
from tests.helpers import OPEN_ACCESS, GatewayProcess, metric_value, run_cli

pytestmark = pytest.mark.timeout(90)

REQUEST_ID = "x-tollway-request-id"
GPT_4O = (Decimal("2.50"), Decimal("10.00"))  # list price per million tokens, input and output
PROMPT = "spend"  # five characters: two input tokens, estimated and reported alike


def _setup(deployment, limits: str, toml: str = "") -> None:
    (deployment.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n" + limits)
    if toml:
        deployment.write_toml(toml)


def _fresh_window(window: str, needed_s: float) -> None:
    """Wait for the next window if fewer than `needed_s` seconds of this one are left."""
    now = datetime.now(UTC)
    left = (window_end(window, window_start(window, now)) - now).total_seconds()
    if left < needed_s:
        time.sleep(left + 0.1)


def _seconds_left(window: str) -> float:
    now = datetime.now(UTC)
    return (window_end(window, window_start(window, now)) - now).total_seconds()


def _usd(input_tokens: int, output_tokens: int, prices=GPT_4O) -> Decimal:
    return ((input_tokens * prices[0] + output_tokens * prices[1]) / 1_000_000).quantize(Decimal("1e-9"))


def _rid(response: httpx.Response) -> uuid.UUID:
    return uuid.UUID(response.headers[REQUEST_ID])


# --- one call per provider route, raw ------------------------------------------------------------
def _openai(http: httpx.Client, gw: GatewayProcess, who: str, model: str = "gpt-4o-mini", max_tokens: int | None = 16,
            headers: dict | None = None, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stream:
        body["stream"] = True
    return http.post(gw.url + "/openai/v1/chat/completions", json=body,
                     headers={"authorization": f"Bearer {gw.deployment.tokens[who]}", **(headers or {})})


def _anthropic(http: httpx.Client, gw: GatewayProcess, who: str) -> httpx.Response:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT}]}
    return http.post(gw.url + "/anthropic/v1/messages", json=body, headers={"x-api-key": gw.deployment.tokens[who]})


def _gemini(http: httpx.Client, gw: GatewayProcess, who: str) -> httpx.Response:
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], "generationConfig": {"maxOutputTokens": 16}}
    return http.post(gw.url + "/gemini/v1beta/models/gemini-2.5-flash:generateContent", json=body,
                     headers={"x-goog-api-key": gw.deployment.tokens[who]})


def _message(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def _assert_names_limit(message: str, tenant: str, metric_word: str, window: str, limit: str) -> None:
    assert f"'{tenant}'" in message, message
    assert re.search(rf"\b{re.escape(limit)} {metric_word} per {window}\b", message), message


def _assert_refused_event(event: dict, outcome: str) -> None:
    assert (event["outcome"], event["status_code"]) == (outcome, 429), event
    assert event["key_id"] is None and event["billing_mode"] is None, "a refused request used no key"
    assert event["cost_usd"] is None and event["usage_source"] == "none" and event["input_tokens"] is None


def _by_id(gw: GatewayProcess) -> dict[uuid.UUID, dict]:
    assert gw.stop() == 0, gw.log()
    return {row["event_id"]: row for row in gw.deployment.events()}


# --- requests per minute, each user, in each provider's format -----------------------------------
def test_a_user_limited_to_10_requests_a_minute_gets_10_then_429_in_every_format(deployment, sim):
    _setup(deployment, "*,*,requests,minute,10\n")
    gw = GatewayProcess(deployment).start()
    try:
        _fresh_window("minute", 10)  # every request below inside one minute window
        calls = {"bob": lambda h: _openai(h, gw, "bob"), "alice": lambda h: _anthropic(h, gw, "alice"),
                 "carol": lambda h: _gemini(h, gw, "carol")}
        results: dict[str, list[httpx.Response]] = {}
        with httpx.Client(timeout=10) as http:
            for who, call in calls.items():
                results[who] = [call(http) for _ in range(13)]
            # another user of the same tenant has a counter of their own
            dana = _openai(http, gw, "dana")
        sdk = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=deployment.tokens["bob"], max_retries=0)
        with pytest.raises(openai.RateLimitError) as via_sdk:
            sdk.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}])
        left = _seconds_left("minute")
        assert len(sim.requests) == 31, "a refused request never reaches the provider"
        assert dana.status_code == 200

        for who, responses in results.items():
            statuses = [r.status_code for r in responses]
            assert statuses == [200] * 10 + [429] * 3, (who, statuses)
            for refused in responses[10:]:
                retry_after = int(refused.headers["retry-after"])
                assert 1 <= retry_after <= 60 and abs(retry_after - left) <= 3, (retry_after, left)
                tenant = "globex" if who == "carol" else "acme"
                _assert_names_limit(_message(refused), tenant, "requests", "minute", "10")
        bob_refused, alice_refused, carol_refused = (results[w][10] for w in ("bob", "alice", "carol"))
        error = bob_refused.json()["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded"), error
        assert alice_refused.json()["type"] == "error"
        assert alice_refused.json()["error"]["type"] == "rate_limit_error"
        error = carol_refused.json()["error"]
        assert (error["code"], error["status"]) == (429, "RESOURCE_EXHAUSTED"), error
        assert via_sdk.value.status_code == 429 and "10 requests per minute" in via_sdk.value.message
    finally:
        events = _by_id(gw)

    for responses in results.values():
        for response in responses[:10]:
            assert events[_rid(response)]["outcome"] == "ok"
        for response in responses[10:]:
            _assert_refused_event(events[_rid(response)], "rate_limited")
    assert sum(e["outcome"] == "rate_limited" for e in events.values()) == 10


def test_a_tokens_per_minute_limit_counts_reserved_then_real_tokens(deployment, sim):
    _setup(deployment, "acme,bob@acme.com,tokens,minute,1000\n")
    gw = GatewayProcess(deployment).start()
    long_reply = {"x-sim-output-tokens": "300"}
    try:
        _fresh_window("minute", 10)  # every request below inside one minute window
        with httpx.Client(timeout=10) as http:
            # each: 2 input tokens + 300 output tokens, reserved and then reported
            admitted = [_openai(http, gw, "bob", max_tokens=300, headers=long_reply) for _ in range(3)]
            too_big = _openai(http, gw, "bob", max_tokens=300, headers=long_reply)  # 906 + 302 > 1000
            fits = _openai(http, gw, "bob", max_tokens=90, headers=long_reply)  # 906 + 92 <= 1000
            full = _openai(http, gw, "bob", max_tokens=10)  # 998 + 12 > 1000
            no_cap = _openai(http, gw, "bob", max_tokens=None)  # reserves the default 4096 output tokens
            alice = _openai(http, gw, "alice", max_tokens=300, headers=long_reply)  # the limit is bob's alone
        assert [r.status_code for r in admitted] == [200, 200, 200]
        assert [r.json()["usage"]["total_tokens"] for r in admitted] == [302, 302, 302]
        assert (too_big.status_code, fits.status_code, full.status_code, no_cap.status_code) == (429, 200, 429, 429)
        assert fits.json()["usage"]["total_tokens"] == 92
        assert alice.status_code == 200
        _assert_names_limit(_message(too_big), "acme", "tokens", "minute", "1000")
        assert "line 2" in _message(too_big) and 1 <= int(too_big.headers["retry-after"]) <= 60
    finally:
        events = _by_id(gw)
    for refused in (too_big, full, no_cap):
        _assert_refused_event(events[_rid(refused)], "rate_limited")
    bob = [e for e in events.values() if e["outcome"] == "ok" and e["user_pseudonym"] == events[_rid(fits)]["user_pseudonym"]]
    assert sum(e["input_tokens"] + e["output_tokens"] for e in bob) == 998 <= 1000


def test_a_role_limit_applies_to_each_member_only(deployment, sim):
    deployment.issue_token("frank", "acme", "frank@acme.com", roles=("contractors",))
    _setup(deployment, "acme,role:contractors,requests,hour,2\nacme,role:engineering,requests,hour,3\n")
    _fresh_window("hour", 20)
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            dana = [_openai(http, gw, "dana") for _ in range(3)]  # token roles engineering + contractors
            frank = [_openai(http, gw, "frank") for _ in range(3)]  # contractors: a counter of his own
            alice = [_openai(http, gw, "alice") for _ in range(4)]  # engineering through a g line
            bob = [_openai(http, gw, "bob") for _ in range(6)]  # no role: not limited
    finally:
        events = _by_id(gw)
    assert [r.status_code for r in dana] == [200, 200, 429]
    _assert_names_limit(_message(dana[2]), "acme", "requests", "hour", "2")
    assert [r.status_code for r in frank] == [200, 200, 429]
    assert [r.status_code for r in alice] == [200, 200, 200, 429]
    _assert_names_limit(_message(alice[3]), "acme", "requests", "hour", "3")
    assert "this user" in _message(alice[3]), "a role limit counts each member"
    assert [r.status_code for r in bob] == [200] * 6
    for refused in (dana[2], frank[2], alice[3]):
        _assert_refused_event(events[_rid(refused)], "rate_limited")


def test_a_tenant_limit_is_shared_by_its_users(deployment, sim):
    _setup(deployment, "acme,tenant,requests,hour,5\n")
    _fresh_window("hour", 20)
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            first = [_openai(http, gw, "alice") for _ in range(3)] + [_openai(http, gw, "bob") for _ in range(2)]
            after = [_openai(http, gw, who) for who in ("bob", "alice", "dana")]
            carol = _openai(http, gw, "carol")  # another tenant
    finally:
        events = _by_id(gw)
    assert [r.status_code for r in first] == [200] * 5
    assert [r.status_code for r in after] == [429] * 3
    for refused in after:
        message = _message(refused)
        _assert_names_limit(message, "acme", "requests", "hour", "5")
        assert "tenant 'acme'" in message and "this user" not in message
        _assert_refused_event(events[_rid(refused)], "rate_limited")
    assert carol.status_code == 200


# --- a budget cannot be overshot by concurrency --------------------------------------------------
async def test_200_concurrent_requests_never_spend_more_than_a_1_usd_monthly_budget(deployment, sim):
    _setup(deployment, "acme,tenant,usd,month,1.00\n")
    _fresh_window("month", 60)
    max_tokens, output_tokens = 4000, 3000
    reserved_each = _usd(2, max_tokens)  # 0.040005: at most 24 reservations fit in 1.00 at once
    spent_each = _usd(2, output_tokens)  # 0.030005: 200 of them would spend 6 USD
    assert 200 * spent_each > 6, "without reservations the budget would be overshot six times"
    gw = GatewayProcess(deployment).start()
    body = {"model": "gpt-4o", "max_tokens": max_tokens, "messages": [{"role": "user", "content": PROMPT}]}
    headers = {"authorization": f"Bearer {deployment.tokens['bob']}", "x-sim-latency-ms": "400",
               "x-sim-output-tokens": str(output_tokens)}
    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=250)) as http:
            responses = await asyncio.gather(*(
                http.post(gw.url + "/openai/v1/chat/completions", json=body, headers=headers) for _ in range(200)))
        statuses = [r.status_code for r in responses]
        ok = [r for r in responses if r.status_code == 200]
        refused = [r for r in responses if r.status_code == 429]
        assert len(ok) + len(refused) == 200, sorted(set(statuses))
        assert 24 <= len(ok) <= 33, f"{len(ok)} admitted: reservations did not hold the budget"
        for response in refused:
            error = response.json()["error"]
            assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota", error
            _assert_names_limit(error["message"], "acme", "USD", "month", "1.00")
            retry_after = int(response.headers["retry-after"])
            assert abs(retry_after - _seconds_left("month")) < 120, retry_after
        assert len(sim.requests) == len(ok)
    finally:
        events = _by_id(gw)

    rows = list(events.values())
    assert len(rows) == 200
    admitted = [e for e in rows if e["outcome"] == "ok"]
    assert len(admitted) == len(ok) and all(e["cost_usd"] == spent_each for e in admitted)
    assert all(e["key_id"] == "operator-openai" and e["billing_mode"] == "unified" for e in admitted)
    for event in rows:
        if event["outcome"] != "ok":
            _assert_refused_event(event, "budget_exceeded")
    spent = sum(e["cost_usd"] for e in admitted)
    assert spent <= Decimal("1.00"), f"spent {spent} of a 1.00 USD budget"
    assert spent >= 24 * spent_each
    assert reserved_each * 24 <= Decimal("1.00") < reserved_each * 25


# --- streams settle too ---------------------------------------------------------------------------
def test_streams_hold_their_reservation_until_they_end_and_a_cancelled_stream_releases_it(deployment, sim):
    # one worst-case reservation (4000 output tokens of gpt-4o: 0.040005 USD) fits in the budget, two do not
    _setup(deployment, "acme,tenant,usd,month,0.06\n")
    _fresh_window("month", 60)
    gw = GatewayProcess(deployment).start()
    slow = {"x-sim-output-tokens": "40", "x-sim-chunks": "40", "x-sim-chunk-delay-ms": "250"}  # 10 s
    big = {"x-sim-output-tokens": "20"}
    cancelled_before = sim.cancelled_streams
    try:
        with httpx.Client(timeout=10) as http:
            body = {"model": "gpt-4o", "max_tokens": 4000, "stream": True,
                    "messages": [{"role": "user", "content": PROMPT}]}
            auth = {"authorization": f"Bearer {deployment.tokens['bob']}"}
            with http.stream("POST", gw.url + "/openai/v1/chat/completions", json=body,
                             headers={**auth, **slow}) as stream:
                assert stream.status_code == 200
                cancelled_id = _rid(stream)
                lines = stream.iter_lines()  # held: dropping a half-read iterator would close the connection
                for line in lines:
                    if line.startswith("data:") and '"content"' in line:
                        break
                # the stream still holds its reservation: a second worst case does not fit
                blocked = _openai(http, gw, "alice", model="gpt-4o", max_tokens=4000, headers=big)
                assert blocked.status_code == 429, blocked.text
                assert blocked.json()["error"]["code"] == "insufficient_quota"
                assert next(line for line in lines if line).startswith("data:"), "the stream is still running"
            del lines
            started = time.monotonic()  # the client hung up mid-stream

            admitted = None
            while time.monotonic() - started < 3:
                attempt = _openai(http, gw, "alice", model="gpt-4o", max_tokens=4000, headers=big)
                if attempt.status_code == 200:
                    admitted = attempt
                    break
                time.sleep(0.1)
            assert admitted is not None, "the cancelled stream's reservation was never released"

            # a stream that runs to its end settles its real figures and frees its reservation too
            with http.stream("POST", gw.url + "/openai/v1/chat/completions", json=body,
                             headers={**auth, "x-sim-output-tokens": "30", "x-sim-chunks": "5"}) as done:
                assert done.status_code == 200
                completed_id = _rid(done)
                text = "".join(done.iter_lines())
            assert "[DONE]" in text
            after_stream = _openai(http, gw, "alice", model="gpt-4o", max_tokens=4000, headers=big)
            assert after_stream.status_code == 200, after_stream.text
        deadline = time.monotonic() + 5
        while sim.cancelled_streams == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.cancelled_streams == cancelled_before + 1
    finally:
        events = _by_id(gw)

    cancelled, completed = events[cancelled_id], events[completed_id]
    assert (cancelled["outcome"], cancelled["streamed"], cancelled["status_code"]) == ("cancelled", True, 499)
    assert cancelled["cost_usd"] is not None and Decimal(0) < cancelled["cost_usd"] < _usd(2, 40)
    assert (completed["outcome"], completed["usage_source"]) == ("ok", "reported")
    assert completed["cost_usd"] == _usd(2, 30)
    _assert_refused_event(events[_rid(blocked)], "budget_exceeded")
    spent = sum(e["cost_usd"] or 0 for e in events.values())
    assert spent <= Decimal("0.06")


# --- counters survive a restart -------------------------------------------------------------------
def test_a_restarted_gateway_rebuilds_its_counters_from_the_events(deployment, sim):
    _setup(deployment, "acme,tenant,usd,month,0.02\nglobex,*,requests,day,5\n")
    _fresh_window("month", 60)
    _fresh_window("day", 60)
    reply = {"x-sim-output-tokens": "600"}
    each = _usd(2, 600)  # 0.006005, reserved and spent alike
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            before = [_openai(http, gw, "bob", model="gpt-4o", max_tokens=600, headers=reply) for _ in range(3)]
            refused_before = _openai(http, gw, "bob", model="gpt-4o", max_tokens=600, headers=reply)
            carol_before = [_openai(http, gw, "carol") for _ in range(4)]
    finally:
        assert gw.stop() == 0, gw.log()
    assert [r.status_code for r in before] == [200] * 3 and refused_before.status_code == 429
    assert [r.status_code for r in carol_before] == [200] * 4

    # a NEW gateway process on the same deployment, the same month
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            worst_case = _openai(http, gw, "bob", model="gpt-4o", max_tokens=600, headers=reply)
            small = _openai(http, gw, "alice", model="gpt-4o", max_tokens=100, headers=reply)  # 0.001005
            one_more = _openai(http, gw, "alice", model="gpt-4o", max_tokens=100, headers=reply)
            carol_after = [_openai(http, gw, "carol") for _ in range(2)]
    finally:
        events = _by_id(gw)
    assert worst_case.status_code == 429, "the budget was forgotten by the restart"
    assert worst_case.json()["error"]["code"] == "insufficient_quota"
    _assert_names_limit(_message(worst_case), "acme", "USD", "month", "0.02")
    assert small.status_code == 200, "what was spent is counted, not more"
    assert one_more.status_code == 429, "3 * 0.006005 + 0.001005 + 0.001005 > 0.02"
    assert [r.status_code for r in carol_after] == [200, 429], "carol's 4 requests today were forgotten"
    _assert_names_limit(_message(carol_after[1]), "globex", "requests", "day", "5")

    _assert_refused_event(events[_rid(worst_case)], "budget_exceeded")
    _assert_refused_event(events[_rid(carol_after[1])], "rate_limited")
    acme_spent = sum(e["cost_usd"] or 0 for e in events.values() if e["tenant"] == "acme")
    assert acme_spent == 3 * each + _usd(2, 100) <= Decimal("0.02")


# --- budget alerts --------------------------------------------------------------------------------
def _alert_lines(gw: GatewayProcess) -> list[dict]:
    return [json.loads(line.split("budget alert ", 1)[1]) for line in gw.log().splitlines() if "budget alert {" in line]




def test_budget_alerts_at_50_80_100_percent_are_recorded_once_per_window(deployment, sim):
    # reservations are tiny (no max_tokens, output bound 1), the replies are long: spend jumps past thresholds
    _setup(deployment, "acme,tenant,usd,month,0.01\n",
           toml="[limits]\ndefault_max_output_tokens = 1\n[metering]\nmax_output_tokens = 1\n")
    _fresh_window("month", 60)

    def spend(gw: GatewayProcess, output_tokens: int) -> httpx.Response:
        with httpx.Client(timeout=10) as http:
            return _openai(http, gw, "bob", model="gpt-4o", max_tokens=None,
                           headers={"x-sim-output-tokens": str(output_tokens)})

    gw = GatewayProcess(deployment).start()
    try:
        assert spend(gw, 550).status_code == 200  # 0.005505: 55 %
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert metric_value(metrics, "tollway_budget_alerts_total", tenant="acme", threshold="50") == 1.0
        assert metric_value(metrics, "tollway_budget_alerts_total", tenant="acme", threshold="80") is None
    finally:
        assert gw.stop() == 0
    assert [a["threshold"] for a in _alert_lines(gw)] == [50]

    gw = GatewayProcess(deployment).start()  # a restart within the same month
    try:
        assert spend(gw, 300).status_code == 200  # 0.00851: 85 %
        assert spend(gw, 200).status_code == 200  # 0.010515: 105 %, the provider returned more than reserved
        over = spend(gw, 10)
        assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert metric_value(metrics, "tollway_budget_alerts_total", tenant="acme", threshold="80") == 1.0
        assert metric_value(metrics, "tollway_budget_alerts_total", tenant="acme", threshold="100") == 1.0
        assert metric_value(metrics, "tollway_budget_alerts_total", tenant="acme", threshold="50") is None, (
            "the 50 % alert was repeated after the restart")
        ratio = metric_value(metrics, "tollway_budget_spent_ratio", tenant="acme", window="month", line="2")
        assert ratio == pytest.approx(1.0515)
    finally:
        assert gw.stop() == 0

    gw = GatewayProcess(deployment).start()  # and once more: nothing new to say
    try:
        assert spend(gw, 10).status_code == 429
        metrics = httpx.get(gw.url + "/metrics", timeout=5).text
        assert "tollway_budget_alerts_total{" not in metrics
    finally:
        assert gw.stop() == 0

    listed = run_cli(deployment.path, "audit", "--action", "budget", "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [(e["action"], e["target"], e["details"]["threshold"]) for e in entries] == [
        ("budget.alert", "acme", 50), ("budget.alert", "acme", 80), ("budget.alert", "acme", 100)]
    month_start = window_start("month", datetime.now(UTC))
    for entry in entries:
        details = entry["details"]
        assert (details["tenant"], details["window"], details["line"], details["user_pseudonym"]) == (
            "acme", "month", 2, None)
        assert Decimal(details["limit_usd"]) == Decimal("0.01")
        assert datetime.fromisoformat(details["window_start"]) == month_start
    assert [Decimal(e["details"]["spent_usd"]) for e in entries] == [
        _usd(2, 550), _usd(2, 550) + _usd(2, 300), _usd(2, 550) + _usd(2, 300) + _usd(2, 200)]

    lines = _alert_lines(gw)
    assert [(a["event"], a["tenant"], a["threshold"], a["window"]) for a in lines] == [
        ("budget_alert", "acme", t, "month") for t in (50, 80, 100)]
    assert all("bob" not in json.dumps(a) for a in lines), "no user id in the log line"
    assert run_cli(deployment.path, "audit", "verify").returncode == 0
    assert math.isclose(float(lines[-1]["spent_usd"]), 0.010515)
