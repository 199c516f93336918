"""Hardening against hostile clients and a locked control store, through a real `tollway serve`.

A CLI (or a backup) holding control.db's write lock must delay only the gateway's own bookkeeping
(audit entries, key health), never a request or its event; no request that failed may be recorded
as a success; a body naming a key twice is refused before policy reads it; a credential naming a
tenant that tenants.csv does not list is refused; gauges are read live at scrape time. The hostile
provider (decompression bombs, boundary-less streams, oversized answers) is in `test_faults.py`.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from decimal import Decimal

import httpx
import pytest

from tests.helpers import OPEN_ACCESS, GatewayProcess, free_port, metric_value

pytestmark = pytest.mark.timeout(120)

REQUEST_ID = "x-tollway-request-id"
#: globex's gpt-4.1 goes to a key the provider refuses (401): the key is marked failing.
ROUTES = """p, acme, anthropic/*, acme-anthropic
p, globex, openai/gpt-4.1, refused-openai
p, *, openai/*, operator-openai
p, *, gemini/*, operator-gemini
p, *, anthropic/*, operator-anthropic
"""
CHAT_PATH = "/openai/v1/chat/completions"


def _chat(gw: GatewayProcess, who: str, model: str = "gpt-4o", *, output_tokens: int | None = None,
          timeout: float = 10, **body) -> httpx.Response:
    headers = {"authorization": f"Bearer {gw.deployment.tokens[who]}"}
    if output_tokens is not None:
        headers["x-sim-output-tokens"] = str(output_tokens)
    payload = {"model": model, "messages": [{"role": "user", "content": "spend"}], **body}
    return httpx.post(gw.url + CHAT_PATH, json=payload, headers=headers, timeout=timeout)




def _metrics(gw: GatewayProcess) -> str:
    return httpx.get(gw.url + "/metrics", timeout=5).text


def _events(gw: GatewayProcess) -> dict[uuid.UUID, dict]:
    assert gw.stop() == 0, gw.log()
    return {row["event_id"]: row for row in gw.deployment.events()}


def _rid(response: httpx.Response) -> uuid.UUID:
    return uuid.UUID(response.headers[REQUEST_ID])


class WriteLock:
    """Another process's write transaction on control.db (as `sqlite3 control.db 'BEGIN IMMEDIATE'` holds)."""

    def __init__(self, path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10)

    def __enter__(self) -> WriteLock:
        self._db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc) -> None:
        self._db.execute("ROLLBACK")
        self._db.close()


# --- a locked control store ----------------------------------------------------------------------
def test_a_locked_control_db_delays_the_gateways_bookkeeping_never_a_request_or_its_event(deployment):
    dep = deployment
    (dep.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (dep.path / "policy" / "routes.csv").write_text(ROUTES)
    (dep.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\nacme,tenant,usd,month,0.01\n")
    dep.add_key("refused-openai", "openai", "sk-not-a-key-the-provider-knows")
    # reservations are tiny (output bound 1), the replies long: one request jumps past the 50 % alert
    dep.write_toml("[limits]\ndefault_max_output_tokens = 1\n[metering]\nmax_output_tokens = 1\n")
    gw = GatewayProcess(dep).start()
    try:
        with WriteLock(dep.path / "control.db"):
            spent = _chat(gw, "bob", output_tokens=550)  # gpt-4o: 2 x $2.50 + 550 x $10 per million = $0.005505
            # the provider refuses the key: its 401 passes through; the third in a row marks the key failing
            refused = [_chat(gw, "carol", "gpt-4.1") for _ in range(3)]
            failing = _chat(gw, "carol", "gpt-4.1")  # failing at once, though not yet written down
            health = [httpx.get(gw.url + "/healthz", timeout=2).status_code for _ in range(5)]
            pending = metric_value(_metrics(gw), "tollway_control_writes_pending")
            assert spent.status_code == 200, spent.text
            for answer in refused:
                assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key", answer.text
            assert failing.status_code == 503, failing.text
            assert failing.json()["error"]["code"] == "provider_keys_failing", failing.text
            assert health == [200] * 5
            assert pending == 2.0, "the budget alert's audit entry and the failing key wait for the lock"
            time.sleep(6)  # past the writer's busy timeout: it retries rather than giving up
            assert metric_value(_metrics(gw), "tollway_control_writes_pending") == 2.0
        deadline = time.monotonic() + 15
        while metric_value(_metrics(gw), "tollway_control_writes_pending") != 0.0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric_value(_metrics(gw), "tollway_control_writes_pending") == 0.0
    finally:
        events = _events(gw)
    assert (events[_rid(spent)]["status_code"], events[_rid(spent)]["outcome"]) == (200, "ok")
    assert events[_rid(spent)]["cost_usd"] == Decimal("0.005505")
    for answer in refused:
        assert (events[_rid(answer)]["status_code"], events[_rid(answer)]["outcome"]) == (401, "upstream_error")
    assert (events[_rid(failing)]["status_code"], events[_rid(failing)]["outcome"]) == (503, "upstream_error")
    store = dep.store()
    try:
        [alert] = store.audit_entries(action="budget.alert")
        assert json.loads(alert["details"])["threshold"] == 50
        [marked] = store.audit_entries(action="key.failing")
        assert marked["target"] == "refused-openai"
        assert [k.health for k in store.list_keys() if k.key_id == "refused-openai"] == [
            "failing: provider answered 401 3 times in a row"]
    finally:
        store.close()
    assert "written after the lock cleared" in gw.log()


def test_a_token_revoked_while_requests_run_fails_on_the_next_request(gateway):
    """The snapshot reload moved off the event loop; requests still wait for it, never see a stale token."""
    token = gateway.deployment.issue_token("temp", "acme", "temp@acme.com")
    assert _chat(gateway, "temp", "gpt-4o-mini").status_code == 200
    store = gateway.deployment.store()
    [row] = [t for t in store.list_tokens() if t.user_id == "temp@acme.com"]
    store.revoke_token(row.token_id)
    store.close()
    response = httpx.post(gateway.url + CHAT_PATH, headers={"authorization": f"Bearer {token}"}, timeout=10,
                          json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 401


# --- no failure recorded as a success --------------------------------------------------------------
def _hour_left_at_least(seconds: float) -> None:
    """Wait for the next hour if fewer than `seconds` of this one are left (a limit's window must hold)."""
    left = 3600 - time.time() % 3600
    if left < seconds:
        time.sleep(left + 0.1)


def test_no_failed_request_is_recorded_as_status_0_or_ok(deployment, sim):
    """Every error path a client or provider can reach, each with the status and outcome it must record."""
    dep = deployment
    (dep.path / "policy" / "limits.csv").write_text(
        "tenant,subject,metric,window,limit\nglobex,rita@globex.com,requests,hour,1\n")
    dep.issue_token("stranger", "initech", "eve@initech.com")
    dep.issue_token("rita", "globex", "rita@globex.com")
    closed = free_port()
    dep.write_toml(providers={"gemini": f"http://127.0.0.1:{closed}"})
    _hour_left_at_least(60)
    gw = GatewayProcess(dep).start()
    bob = {"authorization": f"Bearer {dep.tokens['bob']}"}
    rita = {"authorization": f"Bearer {dep.tokens['rita']}"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    gemini_body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    expected: dict[str, tuple[int, str]] = {}
    sent: dict[str, uuid.UUID] = {}
    try:
        with httpx.Client(base_url=gw.url, timeout=15) as http:
            def call(case: str, status: int, outcome: str, method: str = "POST", path: str = CHAT_PATH,
                     **kwargs) -> None:
                response = http.request(method, path, **kwargs)
                assert response.status_code == status, (case, response.status_code, response.text)
                sent[case], expected[case] = _rid(response), (status, outcome)

            call("within the limit", 200, "ok", json=chat, headers=rita)
            call("rate limited", 429, "rate_limited", json=chat, headers=rita)
            call("no credential", 401, "unauthenticated", json=chat)
            call("wrong token", 401, "unauthenticated", json=chat, headers={"authorization": "Bearer tw_wrong"})
            call("unknown tenant", 403, "denied", json=chat,
                 headers={"authorization": f"Bearer {dep.tokens['stranger']}"})
            call("denied model", 403, "denied", json={**chat, "model": "gpt-4.1"}, headers=bob)
            call("malformed json", 400, "bad_request", content=b"{not json", headers=bob)
            call("duplicate key", 400, "bad_request", headers=bob,
                 content=b'{"model": "gpt-4o-mini", "model": "gpt-4.1", "messages": []}')
            call("too large", 413, "bad_request", content=b"x" * (10 * 1024 * 1024 + 1), headers=bob)
            call("unknown provider", 404, "bad_request", path="/nowhere/v1/chat/completions", json=chat)
            call("provider 500", 500, "upstream_error", json=chat, headers={**bob, "x-sim-fault": "status:500"})
            call("provider timeout", 504, "timeout", json=chat, headers={**bob, "x-sim-latency-ms": "6000"})
            call("provider unreachable", 502, "upstream_error",
                 path="/gemini/v1beta/models/gemini-2.5-flash:generateContent",
                 json=gemini_body, headers={"x-goog-api-key": dep.tokens["carol"]})
            call("ok", 200, "ok", json=chat, headers=bob)
            call("streamed ok", 200, "ok", json={**chat, "stream": True}, headers=bob)
            with http.stream("POST", CHAT_PATH, json={**chat, "stream": True},
                             headers={**bob, "x-sim-chunks": "50", "x-sim-chunk-delay-ms": "100"}) as gone:
                sent["client left"], expected["client left"] = _rid(gone), (499, "cancelled")
                next(gone.iter_bytes())
            # last: the provider's 429 cools the key down for the requests after it
            call("provider 429", 429, "upstream_error", json=chat, headers={**bob, "x-sim-fault": "status:429"})
    finally:
        events = _events(gw)
    for case, rid in sent.items():
        assert (events[rid]["status_code"], events[rid]["outcome"]) == expected[case], case
    assert events[sent["unknown tenant"]]["tenant"] is None
    assert events[sent["unknown tenant"]]["user_pseudonym"] is None
    for row in events.values():  # nothing else slipped through either
        assert row["status_code"] != 0, row
        assert (row["outcome"] == "ok") == (200 <= row["status_code"] < 400), row


# --- duplicate keys ---------------------------------------------------------------------------------
DUPLICATES = {  # provider: (path, credential header, prefix, who, body, the key named twice)
    "openai": ("/openai/v1/chat/completions", "authorization", "Bearer ", "bob",
               b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-4.1"}',
               "model"),
    "anthropic": ("/anthropic/v1/messages", "x-api-key", "", "alice",
                  b'{"model": "claude-haiku-4-5", "max_tokens": 5, "max_tokens": 500000, '
                  b'"messages": [{"role": "user", "content": "hi"}]}', "max_tokens"),
    "gemini": ("/gemini/v1beta/models/gemini-2.5-flash:generateContent", "x-goog-api-key", "", "carol",
               b'{"contents": [{"role": "user", "parts": [{"text": "hi", "text": "hello"}]}]}', "text"),
}


@pytest.mark.parametrize("provider", sorted(DUPLICATES))
def test_a_key_named_twice_in_one_object_is_400_in_the_routes_format_and_nothing_goes_upstream(gateway, sim, provider):
    path, header, prefix, who, body, key = DUPLICATES[provider]
    headers = {header: prefix + gateway.deployment.tokens[who], "content-type": "application/json",
               "anthropic-version": "2023-06-01"}
    response = httpx.post(gateway.url + path, content=body, headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] == (f"The request body names '{key}' more than once in one JSON object; "
                                "send each key once.")
    if provider == "anthropic":
        assert response.json()["type"] == "error" and error["type"] == "invalid_request_error"
    if provider == "gemini":
        assert error["code"] == 400 and error["status"] == "INVALID_ARGUMENT"
    assert sim.requests == []


@pytest.mark.parametrize("case, body, status", ids=lambda value: value if isinstance(value, str) and len(value) < 40
                         else "", argvalues=[
    # a colon escaped as \u003a inside a string: the exact check runs, and there is no duplicate
    ("escaped colon, no duplicate", '{"model": "gpt-4o-mini", "messages": [{"role": "user", '
                                    '"content": "time\\u003a 10\\u003A30"}]}', 200),
    ("escaped colon hiding a duplicate", '{"model": "gpt-4o-mini", "messages": [{"role": "user", '
                                         '"content": "a\\u003ab"}], "model": "gpt-4.1"}', 400),
    ("the same key in two objects", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a"}, '
                                    '{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}', 200),
    ("nested duplicate", '{"model": "gpt-4o-mini", "stream_options": {"include_usage": true, "include_usage": false},'
                         ' "messages": [{"role": "user", "content": "a"}]}', 400),
    ("large body, no duplicate", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
                                 + "word: " * 4000 + '"}]}', 200),
    ("large body with a duplicate", '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
                                    + "word: " * 4000 + '"}], "model": "gpt-4.1"}', 400),
])
def test_duplicate_keys_are_found_in_small_large_and_escaped_bodies(gateway, case, body, status):
    response = httpx.post(gateway.url + CHAT_PATH, content=body.encode(), timeout=10,
                          headers={"authorization": f"Bearer {gateway.deployment.tokens['bob']}",
                                   "content-type": "application/json"})
    assert response.status_code == status, (case, response.text)


# --- tenants must exist -----------------------------------------------------------------------------
def test_a_token_of_a_tenant_missing_from_tenants_csv_is_403_until_the_tenant_is_added(deployment):
    dep = deployment
    token = dep.issue_token("eve", "initech", "eve@initech.com", roles=("platform-admins",))
    gw = GatewayProcess(dep).start()
    try:
        refused = _chat(gw, "eve", "gpt-4o-mini")
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "unknown_tenant"
        assert "'initech'" in error["message"] and "tenants.csv" in error["message"]
        anthropic_refusal = httpx.post(gw.url + "/anthropic/v1/messages", timeout=10, headers={"x-api-key": token},
                                       json={"model": "claude-haiku-4-5", "max_tokens": 5,
                                             "messages": [{"role": "user", "content": "hi"}]})
        assert anthropic_refusal.status_code == 403
        assert anthropic_refusal.json()["error"]["type"] == "permission_error"
        with (dep.path / "tenants.csv").open("a") as fh:
            fh.write("initech,Initech,0,0\n")
        deadline = time.monotonic() + 10
        while (answer := _chat(gw, "eve", "gpt-4o-mini")).status_code == 403 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer.status_code == 200, answer.text
    finally:
        events = _events(gw)
    row = events[_rid(refused)]
    assert (row["tenant"], row["outcome"], row["status_code"]) == (None, "denied", 403)
    assert events[_rid(answer)]["tenant"] == "initech"


# --- gauges read live --------------------------------------------------------------------------------
def test_budget_spent_ratio_is_the_live_counter_at_scrape_time_not_the_last_alert(deployment):
    dep = deployment
    (dep.path / "policy" / "access.csv").write_text(OPEN_ACCESS)
    (dep.path / "policy" / "limits.csv").write_text(
        "tenant,subject,metric,window,limit\nacme,tenant,usd,month,0.01\n*,tenant,usd,day,1\n")
    dep.write_toml("[limits]\ndefault_max_output_tokens = 1\n[metering]\nmax_output_tokens = 1\n")
    gw = GatewayProcess(dep).start()
    try:
        before = metric_value(_metrics(gw), "tollway_budget_spent_ratio", tenant="acme", window="month", line="2")
        assert _chat(gw, "bob", output_tokens=550).status_code == 200  # $0.005505: 55 %, the 50 % alert
        assert metric_value(_metrics(gw), "tollway_budget_spent_ratio", tenant="acme", window="month",
                       line="2") == pytest.approx(0.5505)
        assert _chat(gw, "bob", output_tokens=200).status_code == 200  # + $0.002005 = $0.00751: 75 %, no alert
        text = _metrics(gw)
        assert metric_value(text, "tollway_budget_spent_ratio", tenant="acme", window="month",
                       line="2") == pytest.approx(0.751)
        # a `*` line: one series per tenant of tenants.csv, each tenant's own spend
        assert metric_value(text, "tollway_budget_spent_ratio", tenant="acme", window="day",
                       line="3") == pytest.approx(0.00751)
        assert metric_value(text, "tollway_budget_spent_ratio", tenant="globex", window="day", line="3") == 0.0
    finally:
        gw.stop()
    assert before is not None and before < 0.5505
