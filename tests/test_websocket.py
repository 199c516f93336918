"""WebSocket passthrough through a real `tollway serve` and the simulated OpenAI provider: Responses over
WebSocket and Realtime, metered per response; handshake refusals; refused responses answered with an
error frame on a socket that stays usable; limits per response; each side closed when the other closes.

Expected costs are worked out here by hand from the override prices this file writes to pricing.csv
(USD per million tokens): gpt-ws-mini 0.15 in / 0.60 out, gpt-ws-realtime 4.00 in / 16.00 out. The
simulator counts ceil(prompt characters / 4) input tokens and replies with 12 tokens (fewer when the
request caps its output).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from decimal import Decimal

import openai
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from proxy import websocket
from proxy.errors import Unauthenticated, UpstreamUnreachable
from proxy.simulator_ws import WS_STATE_KEY
from tests.helpers import SIM_KEYS, GatewayProcess, dumps

pytestmark = pytest.mark.timeout(90)

PRICES = """openai,gpt-ws-mini,2024-01-01,0.15,0.60,0.075,
openai,gpt-ws-realtime,2024-01-01,4.00,16.00,0.40,
"""
ACCESS = """p, *, acme, openai/gpt-ws-mini, allow
p, *, acme, openai/gpt-ws-realtime, allow
"""
MILLION = Decimal(1_000_000)


def _gateway(deployment, limits: str = "tenant,subject,metric,window,limit\n") -> GatewayProcess:
    (deployment.path / "policy" / "access.csv").write_text(ACCESS)
    (deployment.path / "policy" / "limits.csv").write_text(limits)
    with (deployment.path / "pricing.csv").open("a") as prices:
        prices.write(PRICES)
    return GatewayProcess(deployment).start()


@pytest.fixture
def ws_gateway(deployment):
    gw = _gateway(deployment)
    yield gw
    gw.stop()


def _ws(gateway: GatewayProcess, path: str, token: str | None = None, headers: dict | None = None, **kwargs):
    url = gateway.url.replace("http://", "ws://") + path
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(url, additional_headers={**auth, **(headers or {})}, open_timeout=10, **kwargs)


def _until(ws, *kinds: str) -> list[dict]:
    """Every event received up to and including the first of `kinds`."""
    seen = []
    while True:
        event = json.loads(ws.recv(timeout=10))
        seen.append(event)
        if event["type"] in kinds:
            return seen


def _create(model: str, chars: int, **fields) -> str:
    return json.dumps({"type": "response.create", "model": model, "input": "a" * chars, **fields})


def _cost(input_tokens: int, output_tokens: int, inp: str, out: str) -> Decimal:
    return (input_tokens * Decimal(inp) + output_tokens * Decimal(out)) / MILLION


def _stopped_events(gateway: GatewayProcess) -> list[dict]:
    assert gateway.stop() == 0, gateway.log()
    events = gateway.deployment.events()
    print(dumps(events))
    return events


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_responses_over_websocket_meters_each_response(ws_gateway, sim):
    client = openai.OpenAI(base_url=ws_gateway.url + "/openai/v1", api_key=ws_gateway.deployment.tokens["bob"],
                           max_retries=0)
    ends = []
    with client.responses.connect() as connection:
        connection.response.create(model="gpt-ws-mini", input="a" * 400, max_output_tokens=5)
        ends.append(_sdk_until(connection, "response.completed", "response.incomplete"))
        connection.response.create(model="gpt-ws-mini", input="b" * 800)
        ends.append(_sdk_until(connection, "response.completed", "response.incomplete"))
    assert [e.type for e in ends] == ["response.incomplete", "response.completed"]
    assert [e.response.usage.output_tokens for e in ends] == [5, 12]

    handshake = next(r for r in sim.requests if r.path == "/v1/responses")
    assert handshake.method == "GET" and handshake.headers["authorization"] == f"Bearer {SIM_KEYS['openai']}"
    token = ws_gateway.deployment.tokens["bob"]
    assert token not in json.dumps([handshake.headers, handshake.query])

    events = _stopped_events(ws_gateway)
    assert [(e["input_tokens"], e["output_tokens"], e["cost_usd"]) for e in events] == [
        (100, 5, _cost(100, 5, "0.15", "0.60")),  # 0.000018
        (200, 12, _cost(200, 12, "0.15", "0.60")),  # 0.0000372
    ]
    assert events[0]["cost_usd"] == Decimal("0.000018") and events[1]["cost_usd"] == Decimal("0.0000372")
    for e in events:
        assert (e["tenant"], e["model"], e["endpoint"], e["streamed"], e["status_code"], e["outcome"]) == (
            "acme", "openai/gpt-ws-mini", "openai/responses.create", True, 200, "ok")
        assert (e["key_id"], e["billing_mode"], e["usage_source"]) == ("operator-openai", "unified", "reported")
        assert e["user_pseudonym"] is not None and e["latency_ms"] is not None


def _sdk_until(connection, *kinds: str):
    for event in connection:
        if event.type in kinds:
            return event
    raise AssertionError(f"the socket closed before {kinds}")


def test_realtime_session_meters_each_response(ws_gateway, sim):
    client = openai.OpenAI(base_url=ws_gateway.url + "/openai/v1", api_key=ws_gateway.deployment.tokens["bob"],
                           max_retries=0)
    with client.realtime.connect(model="gpt-ws-realtime") as connection:
        assert _sdk_until(connection, "session.created").session.model == "gpt-ws-realtime"
        for text, cap in (("x" * 400, None), ("y" * 400, 7)):
            connection.conversation.item.create(item={"type": "message", "role": "user",
                                                      "content": [{"type": "input_text", "text": text}]})
            connection.response.create(response={"max_output_tokens": cap} if cap else {})
            done = _sdk_until(connection, "response.done")
            assert done.response.usage.output_tokens == (cap or 12)
    handshake = next(r for r in sim.requests if r.path == "/v1/realtime")
    assert handshake.query == "model=gpt-ws-realtime"
    assert handshake.headers["authorization"] == f"Bearer {SIM_KEYS['openai']}"

    events = _stopped_events(ws_gateway)
    assert [(e["input_tokens"], e["output_tokens"], e["cost_usd"]) for e in events] == [
        (100, 12, Decimal("0.000592")),  # 100 x 4 + 12 x 16, per million
        (200, 7, Decimal("0.000912")),  # the conversation's 200 tokens x 4 + 7 x 16
    ]
    assert {(e["model"], e["endpoint"], e["outcome"], e["streamed"]) for e in events} == {
        ("openai/gpt-ws-realtime", "openai/realtime", "ok", True)}


def test_handshake_with_a_bad_token_is_refused_and_recorded(ws_gateway, sim):
    with pytest.raises(InvalidStatus) as refused:
        _ws(ws_gateway, "/openai/v1/responses", "tw_not-a-real-token")
    assert refused.value.response.status_code == 401
    error = json.loads(refused.value.response.body)["error"]
    assert error["code"] == "invalid_tollway_credential"
    with pytest.raises(InvalidStatus) as denied:  # the model in the handshake is governed too
        _ws(ws_gateway, "/openai/v1/realtime?model=gpt-4o", ws_gateway.deployment.tokens["bob"])
    assert denied.value.response.status_code == 403
    with pytest.raises(InvalidStatus):  # not a provider route
        _ws(ws_gateway, "/nowhere/v1/realtime", ws_gateway.deployment.tokens["bob"])
    assert not [r for r in sim.requests if r.path.startswith("/v1/")]  # nothing reached the provider

    events = _stopped_events(ws_gateway)
    assert [(e["status_code"], e["outcome"], e["endpoint"], e["model"]) for e in events] == [
        (401, "unauthenticated", "openai/responses.create", None),
        (403, "denied", "openai/realtime", "openai/gpt-4o"),
        (404, "bad_request", None, None),
    ]


def test_browser_subprotocol_credential_and_key_never_shown(ws_gateway, sim):
    token = ws_gateway.deployment.tokens["bob"]
    with _ws(ws_gateway, "/openai/v1/realtime?model=gpt-ws-realtime", headers={"x-sim-echo-key": "1"},
             subprotocols=["realtime", f"openai-insecure-api-key.{token}"]) as ws:
        assert ws.subprotocol == "realtime"
        headers = dict(ws.response.headers.raw_items())
        assert "x-tollway-request-id" in headers
        assert SIM_KEYS["openai"] not in json.dumps(headers)  # a provider echoing the key is filtered
        first = ws.recv(timeout=10)
        assert json.loads(first)["type"] == "session.created" and SIM_KEYS["openai"] not in first
    handshake = next(r for r in sim.requests if r.path == "/v1/realtime")
    assert handshake.headers["sec-websocket-protocol"] == "realtime"  # the credential stays here
    assert token not in json.dumps(handshake.headers)


def test_denied_model_gets_an_error_frame_and_the_socket_stays_usable(ws_gateway, sim):
    with _ws(ws_gateway, "/openai/v1/responses", ws_gateway.deployment.tokens["bob"]) as ws:
        ws.send(_create("gpt-4o", 40, stream_id="lane-1"))
        error = json.loads(ws.recv(timeout=10))
        assert error["type"] == "error" and error["status"] == 403 and error["stream_id"] == "lane-1"
        assert error["error"]["code"] == "model_not_allowed" and "openai/gpt-4o" in error["error"]["message"]
        ws.send(_create("gpt-ws-mini", 40))
        assert _until(ws, "response.completed")[-1]["response"]["usage"]["input_tokens"] == 10
    assert sim.app[WS_STATE_KEY].received[-1:] == ["response.create"]  # the denied one never left the gateway
    events = _stopped_events(ws_gateway)
    assert [(e["model"], e["status_code"], e["outcome"]) for e in events] == [
        ("openai/gpt-4o", 403, "denied"), ("openai/gpt-ws-mini", 200, "ok")]


def test_a_token_revoked_mid_session_refuses_the_next_response(ws_gateway, sim):
    with _ws(ws_gateway, "/openai/v1/responses", ws_gateway.deployment.tokens["bob"]) as ws:
        ws.send(_create("gpt-ws-mini", 40))
        _until(ws, "response.completed")
        store = ws_gateway.deployment.store()
        [row] = [t for t in store.list_tokens() if t.user_id == "bob@acme.com"]
        store.revoke_token(row.token_id)
        store.close()
        ws.send(_create("gpt-ws-mini", 40))
        error = json.loads(ws.recv(timeout=10))
        assert (error["type"], error["status"], error["error"]["code"]) == ("error", 401, "invalid_tollway_credential")
    assert [(e["outcome"], e["status_code"]) for e in _stopped_events(ws_gateway)] == [
        ("ok", 200), ("unauthenticated", 401)]


def test_budget_refuses_a_response_mid_session_and_a_cancelled_one_frees_its_reservation(deployment, sim):
    # 0.001 USD a month for acme. A response reserves its input plus max_output_tokens x 0.60 / 1e6:
    # 100 tokens hold ~0.00006, 5,000 hold 0.003 (refused), 1,500 hold 0.0009 (fits only when nothing else is held).
    gateway = _gateway(deployment, "tenant,subject,metric,window,limit\nacme,tenant,usd,month,0.001\n")
    token, closed = deployment.tokens["bob"], sim.app[WS_STATE_KEY].closed
    try:
        with _ws(gateway, "/openai/v1/responses", token) as ws:
            ws.send(_create("gpt-ws-mini", 40, max_output_tokens=100))
            _until(ws, "response.completed")
            ws.send(_create("gpt-ws-mini", 40, max_output_tokens=5000))
            refusal = json.loads(ws.recv(timeout=10))
            assert (refusal["type"], refusal["status"], refusal["error"]["code"]) == ("error", 429, "insufficient_quota")
            ws.send(_create("gpt-ws-mini", 40, max_output_tokens=100))  # still usable
            _until(ws, "response.completed")
        with _ws(gateway, "/openai/v1/responses", token, headers={"x-sim-chunk-delay-ms": "300"}) as ws:
            ws.send(_create("gpt-ws-mini", 40, max_output_tokens=1500))
            _until(ws, "response.output_text.delta")
            before = len(closed)
        _wait_for(lambda: len(closed) == before + 1)  # the client left mid-response: the provider's socket closed
        with _ws(gateway, "/openai/v1/responses", token) as ws:  # the cancelled response's hold is gone
            ws.send(_create("gpt-ws-mini", 40, max_output_tokens=1500))
            assert _until(ws, "response.completed", "error")[-1]["type"] == "response.completed"
    finally:
        events = _stopped_events(gateway)
    assert [(e["outcome"], e["status_code"]) for e in events] == [
        ("ok", 200), ("budget_exceeded", 429), ("ok", 200), ("cancelled", 499), ("ok", 200)]
    cancelled = events[3]
    assert cancelled["usage_source"] == "estimated" and cancelled["input_tokens"] == 10  # cut short, as HTTP meters it


def test_each_side_is_closed_when_the_other_closes(ws_gateway, sim):
    token = ws_gateway.deployment.tokens["bob"]
    ws = _ws(ws_gateway, "/openai/v1/responses", token)
    ws.send(json.dumps({"type": "sim.close", "code": 4001}))  # the provider closes
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd.code == 4001
    with _ws(ws_gateway, "/openai/v1/realtime?model=gpt-ws-realtime", token) as ws:
        ws.recv(timeout=10)
    _wait_for(lambda: sim.app[WS_STATE_KEY].closed[-1:] == [1000])  # the client closed: so did the gateway


def test_gateway_shutdown_closes_sockets_and_records_the_cut_response(ws_gateway, sim):
    with _ws(ws_gateway, "/openai/v1/responses", ws_gateway.deployment.tokens["bob"],
             headers={"x-sim-chunk-delay-ms": "500"}) as ws:
        ws.send(_create("gpt-ws-mini", 40))
        _until(ws, "response.output_text.delta")
        ws_gateway.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1012  # service restart: the client may reconnect
    events = _stopped_events(ws_gateway)
    assert [(e["outcome"], e["status_code"], e["usage_source"]) for e in events] == [("cancelled", 499, "estimated")]


@pytest.mark.parametrize(("error", "code"), [(Unauthenticated("x" * 300), 1008), (UpstreamUnreachable("down"), 1011)])
def test_refusal_without_the_denial_response_extension_is_a_close_with_a_reason(error, code):
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(websocket._deny({"type": "websocket", "extensions": {}}, send, None, None, error))
    assert sent == [{"type": "websocket.close", "code": code, "reason": error.message[:123]}]


def test_a_provider_error_answering_a_response_is_relayed_and_recorded(ws_gateway, sim):
    with _ws(ws_gateway, "/openai/v1/responses", ws_gateway.deployment.tokens["bob"],
             headers={"x-sim-fault": "status:503"}) as ws:
        ws.send(_create("gpt-ws-mini", 40, stream_id="lane-2"))
        error = json.loads(ws.recv(timeout=10))
        assert (error["type"], error["status"], error["stream_id"]) == ("error", 503, "lane-2")
    assert [(e["outcome"], e["status_code"], e["usage_source"]) for e in _stopped_events(ws_gateway)] == [
        ("upstream_error", 503, "none")]


def test_realtime_cached_and_audio_tokens_are_metered_at_their_own_rates(deployment, sim):
    (deployment.path / "policy" / "access.csv").write_text(ACCESS + "p, *, acme, openai/gpt-realtime, allow\n")
    gw = GatewayProcess(deployment).start()
    controls = {"x-sim-input-tokens": "1000", "x-sim-cached-tokens": "200", "x-sim-audio-input-tokens": "300",
                "x-sim-output-tokens": "50", "x-sim-audio-output-tokens": "40"}
    with _ws(gw, "/openai/v1/realtime?model=gpt-realtime", deployment.tokens["bob"], headers=controls) as ws:
        _until(ws, "session.created")
        ws.send(json.dumps({"type": "response.create", "response": {}}))
        usage = _until(ws, "response.done")[-1]["response"]["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (1200, 50)
    event = _stopped_events(gw)[-1]
    assert (event["input_tokens"], event["cached_input_tokens"], event["input_audio_tokens"]) == (1200, 200, 300)
    assert (event["output_tokens"], event["output_audio_tokens"]) == (50, 40)
    # gpt-realtime (price book): text in $4, cached $0.40, audio in $32, text out $16, audio out $64 per million:
    # 700 x 4 + 300 x 32 + 200 x 0.4 + 10 x 16 + 40 x 64 = 15,200 per million
    assert event["cost_usd"] == Decimal("0.0152")
