"""Streaming through a real `tollway serve`: chunks pass through as the provider produces them, a client
that goes away cancels the upstream stream, missing or cut-off usage is still metered, and the
official SDKs read the same answer streamed as not.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from decimal import Decimal

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import types

from proxy.simulator import count_tokens, reply_text
from tests.helpers import GatewayProcess

pytestmark = pytest.mark.timeout(60)

REQUEST_ID = "x-tollway-request-id"
#: list prices (USD per million tokens) of the models used here, from the sample pricing.csv
PRICES = {"openai/gpt-4o-mini": ("0.15", "0.60"), "anthropic/claude-sonnet-4-5": ("3.00", "15.00"),
          "gemini/gemini-2.5-flash": ("0.30", "2.50")}
PROMPT = "Tell me a story about a tollway, one chunk at a time."


def _price(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    per_in, per_out = (Decimal(p) for p in PRICES[model])
    return ((input_tokens * per_in + output_tokens * per_out) / 1_000_000).quantize(Decimal("1e-9"))


class Route:
    """A raw streaming call on one provider route, and how to read its text from an SSE data line."""

    def __init__(self, provider: str, token_name: str, path: str, body: dict, header: str, prefix: str = "") -> None:
        self.provider, self.token_name, self.path, self.body = provider, token_name, path, body
        self.header, self.prefix = header, prefix

    def headers(self, gw: GatewayProcess, extra: dict) -> dict:
        return {self.header: self.prefix + gw.deployment.tokens[self.token_name], **extra}

    def text(self, data: dict) -> str:
        if self.provider == "openai":
            return "".join((c.get("delta") or {}).get("content") or "" for c in data.get("choices") or ())
        if self.provider == "anthropic":
            return (data.get("delta") or {}).get("text") or "" if data.get("type") == "content_block_delta" else ""
        return "".join(p.get("text") or "" for c in data.get("candidates") or ()
                       for p in (c.get("content") or {}).get("parts") or ())


ROUTES = {
    "openai": Route("openai", "bob", "/openai/v1/chat/completions",
                    {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": PROMPT}]},
                    "authorization", "Bearer "),
    "anthropic": Route("anthropic", "alice", "/anthropic/v1/messages",
                       {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True,
                        "messages": [{"role": "user", "content": PROMPT}]}, "x-api-key"),
    "gemini": Route("gemini", "carol", "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
                    {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}, "x-goog-api-key"),
}
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.5-flash"}


def _data(line: str) -> dict | None:
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    return json.loads(payload) if payload.startswith("{") else None


def _one_event(gw: GatewayProcess) -> dict:
    assert gw.stop() == 0, gw.log()
    [event] = gw.deployment.events()
    return event


# --- pass-through --------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_chunks_reach_the_client_as_the_provider_produces_them(gateway, provider):
    route = ROUTES[provider]
    headers = route.headers(gateway, {"x-sim-chunks": "5", "x-sim-chunk-delay-ms": "300"})
    arrivals: list[tuple[float, str]] = []
    with httpx.Client(timeout=10) as http:
        started = time.monotonic()
        with http.stream("POST", gateway.url + route.path, json=route.body, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            request_id = uuid.UUID(response.headers[REQUEST_ID])
            for line in response.iter_lines():
                data = _data(line)
                if data is not None and route.text(data):
                    arrivals.append((time.monotonic() - started, route.text(data)))
        total = time.monotonic() - started

    assert "".join(text for _, text in arrivals) == reply_text(MODELS[provider], 12)
    assert len(arrivals) == 5, arrivals
    times = [t for t, _ in arrivals]
    assert times[0] < 1.0, f"the first chunk waited for the rest: {times}"
    assert total >= 1.2 and times[-1] - times[0] >= 0.9, f"the stream was not paced by the provider: {times}"
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(gap >= 0.1 for gap in gaps), f"chunks were held back and released together: {times}"

    event = _one_event(gateway)
    assert event["event_id"] == request_id
    assert (event["outcome"], event["status_code"], event["streamed"]) == ("ok", 200, True)
    assert event["ttfb_ms"] < 1000 and event["latency_ms"] >= 1200, event
    assert event["usage_source"] == "reported" and event["output_tokens"] == 12


# --- client disconnect ---------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["anthropic", "openai"])
def test_client_disconnect_cancels_the_upstream_stream_and_meters_usage_so_far(gateway, sim, provider):
    route = ROUTES[provider]
    headers = route.headers(gateway, {"x-sim-output-tokens": "60", "x-sim-chunks": "60", "x-sim-chunk-delay-ms": "100"})
    cancelled_before = sim.cancelled_streams
    received = ""
    with httpx.Client(timeout=10) as http:
        started = time.monotonic()
        with http.stream("POST", gateway.url + route.path, json=route.body, headers=headers) as response:
            assert response.status_code == 200
            request_id = uuid.UUID(response.headers[REQUEST_ID])
            pieces = 0
            for line in response.iter_lines():
                data = _data(line)
                if data is not None and route.text(data):
                    received += route.text(data)
                    pieces += 1
                    if pieces == 3:
                        break  # leaving the block closes the connection mid-stream
    assert received and time.monotonic() - started < 3

    deadline = time.monotonic() + 5
    while sim.cancelled_streams == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.cancelled_streams == cancelled_before + 1, "the upstream stream was not aborted"

    event = _one_event(gateway)
    assert event["event_id"] == request_id
    assert (event["outcome"], event["status_code"], event["streamed"]) == ("cancelled", 499, True)
    assert (event["model"], event["tenant"]) == (f"{provider}/{MODELS[provider]}", "acme")
    assert event["key_id"] is not None and event["latency_ms"] < 4000, "recorded when the client left"
    # usage so far is metered: Anthropic reported the input side in message_start (kept as reported),
    # the output side never came, so it is estimated from what was relayed and the record says so;
    # OpenAI reports nothing before the end of a stream, so both sides are estimated
    if provider == "anthropic":
        assert event["usage_source"] == "estimated", event
        assert event["input_tokens"] == count_tokens([{"role": "user", "content": PROMPT}]), event
    else:
        assert event["usage_source"] == "estimated", event
        assert event["input_tokens"] > 0 and event["output_tokens"] > 0, event
    assert event["output_tokens"] is not None and event["cost_usd"] is not None, event
    assert event["cost_usd"] == _price(event["model"], event["input_tokens"], event["output_tokens"])


# --- missing usage -------------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
def test_usage_missing_from_the_provider_is_estimated(gateway, provider):
    route = ROUTES[provider]
    headers = route.headers(gateway, {"x-sim-fault": "no-usage"})
    non_stream_path = route.path.replace(":streamGenerateContent?alt=sse", ":generateContent")
    non_stream_body = {k: v for k, v in route.body.items() if k != "stream"}
    with httpx.Client(timeout=10) as http:
        plain = http.post(gateway.url + non_stream_path, json=non_stream_body, headers=headers)
        assert plain.status_code == 200 and "usage" not in plain.json() and "usageMetadata" not in plain.json()
        streamed_text = ""
        with http.stream("POST", gateway.url + route.path, json=route.body, headers=headers) as response:
            assert response.status_code == 200
            stream_id = uuid.UUID(response.headers[REQUEST_ID])
            for line in response.iter_lines():
                data = _data(line)
                if data is not None:
                    assert not data.get("usage") and "usageMetadata" not in data
                    streamed_text += route.text(data)
    assert streamed_text == reply_text(MODELS[provider], 12)

    assert gateway.stop() == 0
    rows = {row["event_id"]: row for row in gateway.deployment.events()}
    assert set(rows) == {uuid.UUID(plain.headers[REQUEST_ID]), stream_id}
    for event_id, streamed in ((uuid.UUID(plain.headers[REQUEST_ID]), False), (stream_id, True)):
        event = rows[event_id]
        assert (event["outcome"], event["streamed"]) == ("ok", streamed)
        assert event["usage_source"] == "estimated", event
        assert event["input_tokens"] > 0 and event["output_tokens"] > 0, event
        assert event["cost_usd"] == _price(event["model"], event["input_tokens"], event["output_tokens"]) > 0
    # the streamed estimate is the usual four characters a token of the text the client received
    assert rows[stream_id]["output_tokens"] == math.ceil(len(streamed_text) / 4)


def test_estimated_output_is_the_same_for_the_same_answer_streamed_or_not(gateway):
    """Without reported usage, the same reply text must be estimated at the same output tokens."""
    ids = {}
    with httpx.Client(timeout=10) as http:
        for provider, route in ROUTES.items():
            headers = route.headers(gateway, {"x-sim-fault": "no-usage"})
            path = route.path.replace(":streamGenerateContent?alt=sse", ":generateContent")
            plain = http.post(gateway.url + path, json={k: v for k, v in route.body.items() if k != "stream"},
                              headers=headers)
            streamed = http.post(gateway.url + route.path, json=route.body, headers=headers)
            assert plain.status_code == streamed.status_code == 200
            ids[provider] = (uuid.UUID(plain.headers[REQUEST_ID]), uuid.UUID(streamed.headers[REQUEST_ID]))

    assert gateway.stop() == 0
    rows = {row["event_id"]: row for row in gateway.deployment.events()}
    estimates = {provider: (rows[plain]["output_tokens"], rows[streamed]["output_tokens"])
                 for provider, (plain, streamed) in ids.items()}
    assert all(plain == streamed for plain, streamed in estimates.values()), (
        f"(non-streamed, streamed) output estimates of the same reply text differ: {estimates}")


# --- SDKs ----------------------------------------------------------------------------------------
def test_sdk_streams_give_the_same_text_as_non_streamed_answers(gateway):
    tokens, url = gateway.deployment.tokens, gateway.url
    chunked = {"x-sim-chunks": "7"}
    texts = {}

    oa = openai.OpenAI(base_url=url + "/openai/v1", api_key=tokens["bob"], max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    whole = oa.chat.completions.create(model="gpt-4o-mini", messages=messages).choices[0].message.content
    stream = oa.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, extra_headers=chunked)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    texts["openai"] = (whole, pieces)

    an = anthropic.Anthropic(base_url=url + "/anthropic", api_key=tokens["alice"], max_retries=0)
    reply = an.messages.create(model="claude-sonnet-4-5", max_tokens=100, messages=messages)
    with an.messages.stream(model="claude-sonnet-4-5", max_tokens=100, messages=messages,
                            extra_headers=chunked) as s:
        pieces = list(s.text_stream)
    texts["anthropic"] = (reply.content[0].text, pieces)

    gm = genai.Client(api_key=tokens["carol"], http_options=types.HttpOptions(base_url=url + "/gemini",
                                                                               api_version="v1beta"))
    config = types.GenerateContentConfig(http_options=types.HttpOptions(headers=chunked))
    whole = gm.models.generate_content(model="gemini-2.5-flash", contents=PROMPT).text
    pieces = [c.text or "" for c in gm.models.generate_content_stream(model="gemini-2.5-flash", contents=PROMPT,
                                                                       config=config)]
    texts["gemini"] = (whole, pieces)

    for provider, (whole, pieces) in texts.items():
        assert len([p for p in pieces if p]) == 7, (provider, pieces)
        assert "".join(pieces) == whole == reply_text(MODELS[provider], 12), provider

    assert gateway.stop() == 0
    rows = gateway.deployment.events()
    assert [(r["provider"], r["streamed"], r["outcome"]) for r in rows] == [
        (p, s, "ok") for p in ("openai", "anthropic", "gemini") for s in (False, True)]
    for plain, streamed in zip(rows[::2], rows[1::2], strict=True):
        assert plain["usage_source"] == streamed["usage_source"] == "reported"
        assert (plain["input_tokens"], plain["output_tokens"]) == (streamed["input_tokens"], streamed["output_tokens"])
        assert plain["cost_usd"] == streamed["cost_usd"] > 0


# --- cut-off and stalled streams -----------------------------------------------------------------
def test_truncated_stream_delivers_what_was_sent_and_is_recorded(gateway):
    tokens, url = gateway.deployment.tokens, gateway.url
    truncate = {"x-sim-fault": "truncate", "x-sim-chunks": "4"}
    messages = [{"role": "user", "content": PROMPT}]

    oa = openai.OpenAI(base_url=url + "/openai/v1", api_key=tokens["bob"], max_retries=0)
    chunks = list(oa.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                             extra_headers=truncate))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_text("gpt-4o-mini", 12)
    assert all(c.choices[0].finish_reason is None for c in chunks), "the provider never sent its final chunk"

    received = ""
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", url + ROUTES["anthropic"].path, json=ROUTES["anthropic"].body,
            headers=ROUTES["anthropic"].headers(gateway, truncate)) as response:
        kinds = []
        for line in response.iter_lines():
            data = _data(line)
            if data is not None:
                kinds.append(data["type"])
                received += ROUTES["anthropic"].text(data)
    assert received == reply_text("claude-sonnet-4-5", 12)
    assert "message_stop" not in kinds and "message_delta" not in kinds

    assert gateway.stop() == 0
    openai_event, anthropic_event = gateway.deployment.events()
    for event in (openai_event, anthropic_event):
        assert (event["outcome"], event["status_code"], event["streamed"]) == ("ok", 200, True), event
        assert event["input_tokens"] > 0 and event["cost_usd"] is not None, event
    # OpenAI reports usage only in the final chunk that never came: estimated from the relayed text
    assert openai_event["usage_source"] == "estimated"
    assert openai_event["output_tokens"] == math.ceil(len(reply_text("gpt-4o-mini", 12)) / 4)
    # Anthropic reported the input side up front, in message_start: kept; the output side is estimated
    assert anthropic_event["usage_source"] == "estimated"
    assert anthropic_event["input_tokens"] == count_tokens(messages)
    assert anthropic_event["output_tokens"] == math.ceil(len(reply_text("claude-sonnet-4-5", 12)) / 4)


def test_provider_stalling_mid_stream_ends_the_stream_as_a_timeout(deployment):
    path = deployment.path / "tollway.toml"
    path.write_text(path.read_text().replace("read_timeout_s = 5\n", "read_timeout_s = 1\n"))
    gw = GatewayProcess(deployment).start()
    try:
        route = ROUTES["openai"]
        received = ""
        started = time.monotonic()
        with httpx.Client(timeout=10) as http, http.stream(
                "POST", gw.url + route.path, json=route.body,
                headers=route.headers(gw, {"x-sim-fault": "stall", "x-sim-chunks": "4"})) as response:
            assert response.status_code == 200
            request_id = uuid.UUID(response.headers[REQUEST_ID])
            with pytest.raises(httpx.RemoteProtocolError):  # the client can tell the stream broke off
                for line in response.iter_lines():
                    data = _data(line)
                    if data is not None:
                        received += route.text(data)
        assert time.monotonic() - started < 5, "the 1 s read timeout, not the provider's 30 s stall"
        assert received == " ".join(reply_text("gpt-4o-mini", 12).split(" ")[:6]), "the chunks sent before the stall"
        event = _one_event(gw)
    finally:
        gw.stop()
    assert event["event_id"] == request_id
    assert (event["outcome"], event["streamed"]) == ("timeout", True), event


def test_output_of_a_cut_off_anthropic_stream_is_not_metered_as_message_start_placeholder(gateway):
    """`message_start` carries a placeholder `output_tokens` (1); the real figure comes in `message_delta`.
    A stream that ends before it still relayed every text chunk to the client: meter at least those."""
    route = ROUTES["anthropic"]
    received = ""
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", gateway.url + route.path, json=route.body,
            headers=route.headers(gateway, {"x-sim-fault": "truncate", "x-sim-chunks": "4"})) as response:
        for line in response.iter_lines():
            data = _data(line)
            if data is not None:
                received += route.text(data)
    assert received == reply_text("claude-sonnet-4-5", 12)  # 12 tokens, one a word

    event = _one_event(gateway)
    assert event["outcome"] == "ok" and event["input_tokens"] == count_tokens([{"role": "user", "content": PROMPT}])
    assert event["output_tokens"] >= len(received.split()), (
        f"{event['output_tokens']} output token(s) metered for {len(received.split())} relayed")


def test_provider_dropping_the_connection_mid_stream_breaks_the_client_stream(gateway):
    route = ROUTES["openai"]
    received = ""
    with httpx.Client(timeout=10) as http, http.stream(
            "POST", gateway.url + route.path, json=route.body,
            headers=route.headers(gateway, {"x-sim-fault": "disconnect-mid-stream", "x-sim-chunks": "4"})) as response:
        assert response.status_code == 200
        request_id = uuid.UUID(response.headers[REQUEST_ID])
        with pytest.raises(httpx.RemoteProtocolError):  # not a clean end the client could mistake for the answer
            for line in response.iter_lines():
                data = _data(line)
                if data is not None:
                    received += route.text(data)
    assert received == " ".join(reply_text("gpt-4o-mini", 12).split(" ")[:6])

    event = _one_event(gateway)
    assert event["event_id"] == request_id
    assert (event["outcome"], event["streamed"]) == ("upstream_error", True), event
