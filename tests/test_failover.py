"""Key pools through a real `tollway serve`: a refused key fails over and is marked failing, a rate-limited
key cools down, 5xx and connection errors are retried on the next key with backoff, a revoked key hands
its traffic to the next one, and nothing is retried once a byte reached the client."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest

from tests.helpers import SIM_KEYS, GatewayProcess, free_port, run_cli

pytestmark = pytest.mark.timeout(60)

REQUEST_ID = "x-tollway-request-id"
ACCESS = "p, *, acme, openai/*, allow\n"
CHAT = "/openai/v1/chat/completions"
WRONG_SECRET = "sk-wrong-secret-for-tests"


def _pool(deployment, routes: str, keys: dict[str, str], toml: str = "") -> None:
    """Extra openai keys (id -> secret), these routes and no limits; the rest as the fixture made it."""
    for key_id, secret in keys.items():
        deployment.add_key(key_id, "openai", secret)
    (deployment.path / "policy" / "access.csv").write_text(ACCESS)
    (deployment.path / "policy" / "routes.csv").write_text(routes)
    (deployment.path / "policy" / "limits.csv").write_text("tenant,subject,metric,window,limit\n")  # no limits
    if toml:
        deployment.write_toml(toml)


def _chat(http: httpx.Client, gw: GatewayProcess, model: str = "gpt-4o-mini", headers: dict | None = None,
          stream: bool = False) -> httpx.Response:
    body = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hello pool"}]}
    if stream:
        body["stream"] = True
    return http.post(gw.url + CHAT, json=body,
                     headers={"authorization": f"Bearer {gw.deployment.tokens['bob']}", **(headers or {})})


def _rid(response: httpx.Response) -> uuid.UUID:
    return uuid.UUID(response.headers[REQUEST_ID])


def _keys(deployment) -> dict[str, dict]:
    listed = run_cli(deployment.path, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {k["id"]: k for k in json.loads(listed.stdout)}


def _presented(sim, since: int = 0) -> list[str]:
    """The provider keys the simulator saw, in order."""
    return [r.headers.get("authorization", "").removeprefix("Bearer ") for r in sim.requests[since:]]


def _events(gw: GatewayProcess) -> dict[uuid.UUID, dict]:
    assert gw.stop() == 0, gw.log()
    return {row["event_id"]: row for row in gw.deployment.events()}


def _key_failures(metrics: str, key_id: str, reason: str) -> float:
    prefix = f'tollway_key_failures_total{{key_id="{key_id}",reason="{reason}"}} '
    return sum(float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix))


# --- 401/403: failing keys ------------------------------------------------------------------------
def test_a_refused_key_fails_over_to_the_next_and_is_marked_failing_after_three_401s_in_a_row(deployment, sim):
    _pool(deployment, "p, *, openai/*, bad-key|operator-openai\n", {"bad-key": WRONG_SECRET})
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            first = _chat(http, gw)
            assert first.status_code == 200, first.text
            assert _presented(sim) == [WRONG_SECRET, SIM_KEYS["openai"]], "tried in order, then the next key"
            assert _keys(deployment)["bad-key"]["health"] == "ok", "one 401 may be the provider's hiccup"

            again = [_chat(http, gw) for _ in range(2)]  # the second and third 401 in a row
            assert [r.status_code for r in again] == [200, 200]
            assert _presented(sim) == [WRONG_SECRET, SIM_KEYS["openai"]] * 3
            keys = _keys(deployment)
            assert keys["bad-key"]["health"] == "failing: provider answered 401 3 times in a row", keys
            assert keys["operator-openai"]["health"] == "ok"
            assert WRONG_SECRET not in json.dumps(keys), "keys list never shows a secret"
            human = run_cli(deployment.path, "keys", "list")
            assert "failing" in human.stdout and "keys rotate bad-key" in human.stdout, human.stdout

            seen = len(sim.requests)
            later = [_chat(http, gw) for _ in range(3)]
            assert [r.status_code for r in later] == [200] * 3
            assert _presented(sim, seen) == [SIM_KEYS["openai"]] * 3, "a failing key is skipped"
            metrics = http.get(gw.url + "/metrics").text
            assert _key_failures(metrics, "bad-key", "401") == 3.0

            # the operator fixes the key: rotation clears its health and it serves again, first in the pool
            rotated = run_cli(deployment.path, "keys", "rotate", "bad-key", stdin=SIM_KEYS["openai"] + "\n")
            assert rotated.returncode == 0, rotated.stderr
            assert _keys(deployment)["bad-key"]["health"] == "ok"
            seen = len(sim.requests)
            healed = _chat(http, gw)
            assert healed.status_code == 200 and len(sim.requests) == seen + 1
        assert "bad-key marked failing" in gw.log()
        assert WRONG_SECRET not in gw.log() and SIM_KEYS["openai"] not in gw.log()
    finally:
        events = _events(gw)
    for response in (first, *again):
        event = events[_rid(response)]
        assert (event["outcome"], event["key_id"], event["attempts"], event["billing_mode"]) == (
            "ok", "operator-openai", 2, "unified")
        assert event["usage_source"] == "reported" and event["cost_usd"] > 0
    for response in later:
        assert (events[_rid(response)]["key_id"], events[_rid(response)]["attempts"]) == ("operator-openai", 1)
    assert (events[_rid(healed)]["key_id"], events[_rid(healed)]["attempts"]) == ("bad-key", 1)


def test_a_pool_whose_every_key_is_refused_passes_the_providers_401_then_answers_503_for_the_operator(
        deployment, sim):
    _pool(deployment, "p, *, openai/*, bad-1|bad-2\n", {"bad-1": WRONG_SECRET, "bad-2": WRONG_SECRET + "2"})
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            refused = [_chat(http, gw) for _ in range(3)]
            assert len(sim.requests) == 6, "each key tried by each request until its third 401"
            after = _chat(http, gw)
            assert len(sim.requests) == 6, "no usable key left: the provider is not called"
        for response in refused:
            assert response.status_code == 401 and response.json()["error"]["message"] == "Invalid API key provided."
        assert after.status_code == 503
        error = after.json()["error"]
        assert error["code"] == "provider_keys_failing"
        message = error["message"]
        assert "acme" in message and "openai/gpt-4o-mini" in message and "rotate" in message, message
        assert "not about your credential" in message
        keys = _keys(deployment)
        assert keys["bad-1"]["health"].startswith("failing") and keys["bad-2"]["health"].startswith("failing")
    finally:
        events = _events(gw)
    for response in refused:
        assert (events[_rid(response)]["key_id"], events[_rid(response)]["attempts"]) == ("bad-2", 2)
        assert (events[_rid(response)]["outcome"], events[_rid(response)]["status_code"]) == ("upstream_error", 401)
    assert (events[_rid(after)]["outcome"], events[_rid(after)]["status_code"]) == ("upstream_error", 503)
    assert events[_rid(after)]["key_id"] is None


def test_a_provider_403_passes_through_without_failover_and_never_marks_the_key(deployment, sim):
    _pool(deployment, "p, *, openai/*, openai-1|openai-2\n",
          {"openai-1": SIM_KEYS["openai"], "openai-2": SIM_KEYS["openai"]})
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            forbidden = [_chat(http, gw, "gpt-4o-mini", {"x-sim-fault": "status:403"}) for _ in range(4)]
            assert [r.status_code for r in forbidden] == [403] * 4
            assert len(sim.requests) == 4, "a 403 is about the request: the pool's next key is not tried"
            assert _chat(http, gw).status_code == 200
        keys = _keys(deployment)
        assert keys["openai-1"]["health"] == "ok" and keys["openai-2"]["health"] == "ok"
    finally:
        events = _events(gw)
    for response in forbidden:
        assert (events[_rid(response)]["outcome"], events[_rid(response)]["key_id"]) == ("upstream_error", "openai-1")


# --- 429: cool-down -------------------------------------------------------------------------------
def test_a_rate_limited_key_cools_down_for_retry_after_and_the_pool_moves_on(deployment, sim):
    # gpt-4o-mini is served by openai-1 alone; every other model by the pool openai-1|openai-2
    _pool(deployment, "p, *, openai/gpt-4o-mini, openai-1\np, *, openai/*, openai-1|openai-2\n",
          {"openai-1": SIM_KEYS["openai"], "openai-2": SIM_KEYS["openai"]})
    gw = GatewayProcess(deployment).start()
    fault = {"x-sim-fault": "status:429"}
    try:
        with httpx.Client(timeout=10) as http:
            limited = _chat(http, gw, "gpt-4o-mini", fault)
            assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
            assert len(sim.requests) == 1

            skipped = _chat(http, gw, "gpt-4o")  # openai-1 cools down: straight to openai-2
            assert skipped.status_code == 200 and len(sim.requests) == 2

            time.sleep(1.1)  # the provider's Retry-After has passed
            back = _chat(http, gw, "gpt-4o")
            assert back.status_code == 200 and len(sim.requests) == 3

            both = _chat(http, gw, "gpt-4o", fault)  # every key of the pool answers 429
            assert len(sim.requests) == 5, "each key of the pool is tried once"
            assert both.status_code == 429 and both.headers["retry-after"] == "1"
            assert both.json()["error"]["message"] == "Simulated error with status 429.", "the provider's own 429"

            cooling = [_chat(http, gw, "gpt-4o"), _chat(http, gw, "gpt-4o-mini")]
            assert len(sim.requests) == 5, "while every key cools down the provider is not called"
            for response in cooling:
                assert response.status_code == 429 and response.headers["retry-after"] == "1"
                error = response.json()["error"]
                assert "cooling down" in error["message"] and error["code"] == "rate_limit_exceeded", error

            time.sleep(1.1)
            recovered = _chat(http, gw, "gpt-4o")
            assert recovered.status_code == 200 and len(sim.requests) == 6
            metrics = http.get(gw.url + "/metrics").text
        assert _key_failures(metrics, "openai-1", "429") == 2.0
        assert _key_failures(metrics, "openai-2", "429") == 1.0
        assert all(k["health"] == "ok" for k in _keys(deployment).values()), "a 429 is not a failing key"
    finally:
        events = _events(gw)

    def used(response: httpx.Response) -> tuple:
        event = events[_rid(response)]
        return event["key_id"], event["attempts"], event["outcome"], event["status_code"]

    assert used(limited) == ("openai-1", 1, "upstream_error", 429)
    assert used(skipped) == ("openai-2", 1, "ok", 200)
    assert used(back) == ("openai-1", 1, "ok", 200)
    assert used(both) == ("openai-2", 2, "upstream_error", 429)
    for response in cooling:
        assert used(response) == (None, 0, "rate_limited", 429)
    assert used(recovered) == ("openai-1", 1, "ok", 200)


# --- 5xx and connection errors: retried on the next key with backoff ------------------------------
def test_5xx_on_every_key_tries_the_whole_pool_with_backoff_and_passes_the_last_error_through(deployment, sim):
    _pool(deployment, "p, *, openai/*, openai-1|openai-2|openai-3\n",
          {f"openai-{i}": SIM_KEYS["openai"] for i in (1, 2, 3)}, toml="[limits]\nretry_backoff_ms = 100\n")
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            started = time.monotonic()
            failed = _chat(http, gw, headers={"x-sim-fault": "status:503"})
            elapsed = time.monotonic() - started
            direct = http.post(sim.url + CHAT, json={"model": "m"}, headers={
                "authorization": f"Bearer {SIM_KEYS['openai']}", "x-sim-fault": "status:503"})
            assert len(sim.requests) == 3 + 1
            sim.clear()
            # a stream whose answer is an error has sent nothing yet: retried alike
            streamed = _chat(http, gw, headers={"x-sim-fault": "status:503"}, stream=True)
            assert streamed.status_code == 503 and len(sim.requests) == 3
            sim.clear()
            fine = _chat(http, gw)
            assert fine.status_code == 200 and len(sim.requests) == 1, "a 5xx neither fails nor cools a key"
        assert failed.status_code == 503 and failed.content == direct.content
        assert elapsed >= 0.1 + 0.2, f"backoff of 100 ms, doubling, between the three attempts ({elapsed:.3f} s)"
        assert all(k["health"] == "ok" for k in _keys(deployment).values())
    finally:
        events = _events(gw)
    event = events[_rid(failed)]
    assert (event["key_id"], event["attempts"], event["outcome"], event["status_code"]) == (
        "openai-3", 3, "upstream_error", 503)
    assert event["usage_source"] == "none" and event["cost_usd"] is None
    assert (events[_rid(fine)]["key_id"], events[_rid(fine)]["attempts"]) == ("openai-1", 1)
    stream_event = events[_rid(streamed)]
    assert (stream_event["streamed"], stream_event["key_id"], stream_event["attempts"]) == (True, "openai-3", 3)


def test_a_connection_error_is_retried_on_the_next_key(deployment, sim):
    # Every key of a route shares the provider's base URL, so a refused connection hits each key alike:
    # the pool is tried in full, then the client gets the gateway's own 502.
    _pool(deployment, "p, *, openai/*, openai-1|openai-2\n",
          {"openai-1": SIM_KEYS["openai"], "openai-2": SIM_KEYS["openai"]})
    deployment.write_toml(providers={"openai": f"http://127.0.0.1:{free_port()}"})
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            failed = _chat(http, gw)
            metrics = http.get(gw.url + "/metrics").text
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_unreachable"
        assert _key_failures(metrics, "openai-1", "upstream_error") == 1.0
        assert _key_failures(metrics, "openai-2", "upstream_error") == 1.0
    finally:
        events = _events(gw)
    event = events[_rid(failed)]
    assert (event["key_id"], event["attempts"], event["outcome"], event["status_code"]) == (
        "openai-2", 2, "upstream_error", 502)


def test_a_response_cut_before_anything_reached_the_client_is_retried(deployment, sim):
    # non-streaming: the provider drops the connection half-way through its body, which the gateway
    # reads whole before answering, so the client has seen nothing and the next key is tried
    _pool(deployment, "p, *, openai/*, openai-1|openai-2\n",
          {"openai-1": SIM_KEYS["openai"], "openai-2": SIM_KEYS["openai"]})
    gw = GatewayProcess(deployment).start()
    try:
        with httpx.Client(timeout=10) as http:
            failed = _chat(http, gw, headers={"x-sim-fault": "disconnect-mid-stream"})
        assert len(sim.requests) == 2
        assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_unreachable"
    finally:
        events = _events(gw)
    event = events[_rid(failed)]
    assert (event["key_id"], event["attempts"], event["outcome"]) == ("openai-2", 2, "upstream_error")


# --- never a retry once a byte reached the client -------------------------------------------------
def test_a_stream_that_breaks_after_its_first_bytes_is_not_retried(deployment, sim):
    _pool(deployment, "p, *, openai/*, openai-1|openai-2\n",
          {"openai-1": SIM_KEYS["openai"], "openai-2": SIM_KEYS["openai"]})
    gw = GatewayProcess(deployment).start()
    received = b""
    try:
        with httpx.Client(timeout=10) as http:
            body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "stream"}]}
            headers = {"authorization": f"Bearer {deployment.tokens['bob']}", "x-sim-fault": "disconnect-mid-stream",
                       "x-sim-chunks": "8", "x-sim-output-tokens": "40"}
            # the body ends without its terminating chunk
            with pytest.raises(httpx.HTTPError), http.stream("POST", gw.url + CHAT, json=body,
                                                             headers=headers) as response:
                status, rid = response.status_code, _rid(response)
                for chunk in response.iter_raw():
                    received += chunk
            time.sleep(0.3)
        assert status == 200
        assert received.startswith(b"data: ") and b'"content"' in received, received
        assert b"[DONE]" not in received
        assert len(sim.requests) == 1, "a stream that already reached the client must not be replayed"
    finally:
        events = _events(gw)
    event = events[rid]
    assert (event["key_id"], event["attempts"], event["streamed"]) == ("openai-1", 1, True)
    assert event["outcome"] == "upstream_error" and event["status_code"] == 200


# --- revoking a key of a pool while traffic flows ------------------------------------------------
async def test_revoking_a_pool_key_moves_traffic_to_the_next_key_without_a_failed_request(deployment, sim):
    _pool(deployment, "p, *, openai/*, openai-1|openai-2\n",
          {"openai-1": SIM_KEYS["openai"], "openai-2": SIM_KEYS["openai"]})
    gw = GatewayProcess(deployment).start()
    body = {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "keep going"}]}
    headers = {"authorization": f"Bearer {deployment.tokens['bob']}", "x-sim-latency-ms": "20"}
    responses: list[httpx.Response] = []
    stop = asyncio.Event()

    async def worker(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            responses.append(await http.post(gw.url + CHAT, json=body, headers=headers))

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            workers = [asyncio.create_task(worker(http)) for _ in range(6)]
            await asyncio.sleep(0.5)
            revoked = await asyncio.to_thread(run_cli, deployment.path, "keys", "revoke", "openai-1")
            revoked_at = datetime.now(UTC)
            await asyncio.sleep(0.8)
            stop.set()
            await asyncio.gather(*workers)
        assert revoked.returncode == 0, revoked.stderr
        assert [r.status_code for r in responses] == [200] * len(responses), "a request failed during the revoke"
    finally:
        events = _events(gw)

    rows = [events[_rid(r)] for r in responses]
    assert all(e["outcome"] == "ok" and e["attempts"] == 1 for e in rows)
    before = [e for e in rows if e["key_id"] == "openai-1"]
    after = [e for e in rows if e["ts"] > revoked_at]
    assert before, "openai-1 served until it was revoked"
    assert len(after) >= 5 and all(e["key_id"] == "openai-2" for e in after), "a revoked key was still used"
    assert max(e["ts"] for e in before) <= revoked_at
