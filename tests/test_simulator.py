"""Tests of the simulated providers, driven through the official SDKs."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from proxy.simulator import SimRequest, Simulator, reply_text, split_text

KEYS = {"openai": "sk-sim-openai", "anthropic": "sk-ant-sim", "gemini": "gm-sim-key"}
FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = "Tell me something deterministic, please."  # 40 characters -> 10 tokens
PROMPT_TOKENS = math.ceil(len(PROMPT) / 4)


@pytest.fixture(scope="module")
def sim():
    with Simulator(keys=KEYS) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(sim):
    sim.clear()


def oai(sim, key=KEYS["openai"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.url + "/openai/v1", api_key=key, max_retries=0)


def ant(sim, key=KEYS["anthropic"]) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=sim.url + "/anthropic", api_key=key, max_retries=0)


def gem(sim, key=KEYS["gemini"]) -> genai.Client:
    options = genai_types.HttpOptions(base_url=sim.url + "/gemini", api_version="v1beta")
    client = genai.Client(api_key=key, http_options=options)
    _KEEP_ALIVE.append(client)  # a collected client closes its connection pool under the caller
    return client


_KEEP_ALIVE: list[genai.Client] = []


def gem_config(**headers: str) -> genai_types.GenerateContentConfig:
    return genai_types.GenerateContentConfig(http_options=genai_types.HttpOptions(headers=headers))


USER = [{"role": "user", "content": PROMPT}]


def chat_body(**extra) -> dict:
    return {"model": "gpt-4o", "messages": USER, **extra}


def post(sim, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(sim.url + path, content=data, headers=headers or {}, **kw)


def _wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def sse_events(raw: str) -> list[tuple[str | None, str]]:
    """Minimal SSE parser: (event name, data) for each event; comments ignored."""
    events = []
    for block in re.split(r"\r?\n\r?\n", raw):
        name, data = None, []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())
        if data:
            events.append((name, "\n".join(data)))
    return events


# --------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------


def test_openai_chat_non_stream(sim):
    headers = {"x-sim-cached-tokens": "6", "x-sim-reasoning-tokens": "4"}
    result = oai(sim).chat.completions.create(model="gpt-4o-mini", messages=USER, extra_headers=headers)
    assert result.object == "chat.completion"
    assert result.model == "gpt-4o-mini"
    assert result.choices[0].message.content == reply_text("gpt-4o-mini", 12)
    assert result.choices[0].finish_reason == "stop"
    usage = result.usage
    assert usage.prompt_tokens == PROMPT_TOKENS + 6
    assert usage.prompt_tokens_details.cached_tokens == 6
    assert usage.completion_tokens == 12 + 4
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_openai_chat_stream_with_usage(sim):
    stream = oai(sim).chat.completions.create(
        model="gpt-4o",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-output-tokens": "20", "x-sim-chunks": "7"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text("gpt-4o", 20)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 7
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_TOKENS, 20)
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_openai_chat_stream_without_include_usage_has_no_usage(sim):
    raw = post(
        sim,
        "/openai/v1/chat/completions",
        chat_body(stream=True),
        {"authorization": "Bearer " + KEYS["openai"]},
    ).text
    assert '"usage"' not in raw
    assert raw.endswith("data: [DONE]\n\n")
    payloads = [json.loads(d) for _, d in sse_events(raw) if d != "[DONE]"]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_openai_max_tokens_limits_output(sim):
    result = oai(sim).chat.completions.create(model="gpt-4o", messages=USER, max_completion_tokens=5)
    assert len(result.choices[0].message.content.split()) == 5
    assert result.usage.completion_tokens == 5
    assert result.choices[0].finish_reason == "length"


def test_openai_responses_non_stream(sim):
    result = oai(sim).responses.create(
        model="gpt-4.1", input=PROMPT, instructions="Be brief.", extra_headers={"x-sim-cached-tokens": "3"}
    )
    assert result.object == "response" and result.status == "completed"
    assert result.model == "gpt-4.1"
    assert result.output_text == reply_text("gpt-4.1", 12)
    expected_input = math.ceil((len(PROMPT) + len("Be brief.")) / 4) + 3
    assert result.usage.input_tokens == expected_input
    assert result.usage.input_tokens_details.cached_tokens == 3
    assert result.usage.output_tokens == 12
    assert result.usage.total_tokens == expected_input + 12


def test_openai_responses_stream(sim):
    headers = {"x-sim-reasoning-tokens": "8"}
    events = list(
        oai(sim).responses.create(model="o3-mini", input=PROMPT, stream=True, extra_headers=headers)
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == reply_text("o3-mini", 12)
    usage = events[-1].response.usage
    assert usage.output_tokens == 20 and usage.output_tokens_details.reasoning_tokens == 8
    with oai(sim).responses.stream(model="o3-mini", input=PROMPT) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == reply_text("o3-mini", 12)
    assert final.usage.input_tokens == PROMPT_TOKENS


def test_openai_embeddings_and_models(sim):
    client = oai(sim)
    default = client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float", dimensions=8
    )
    assert len(default.data) == 2 and len(default.data[0].embedding) == 16
    assert default.data[0].embedding[:8] == floats.data[0].embedding
    assert default.usage.prompt_tokens == default.usage.total_tokens == 2 + 1
    assert default.model == "text-embedding-3-small"
    assert "gpt-4o" in [m.id for m in client.models.list()]


# --------------------------------------------------------------------------
# Anthropic
# --------------------------------------------------------------------------


def test_anthropic_messages_create(sim):
    message = ant(sim).messages.create(
        model="claude-sonnet-4-6",
        max_tokens=100,
        system="Be brief.",
        messages=USER,
        extra_headers={"x-sim-cached-tokens": "50", "x-sim-cache-write-tokens": "7"},
    )
    assert message.type == "message" and message.model == "claude-sonnet-4-6"
    assert message.content[0].text == reply_text("claude-sonnet-4-6", 12)
    assert message.stop_reason == "end_turn"
    usage = message.usage
    assert usage.input_tokens == math.ceil((len(PROMPT) + len("Be brief.")) / 4)
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (50, 7)
    assert usage.output_tokens == 12


def test_anthropic_messages_stream(sim):
    headers = {"x-sim-cached-tokens": "40", "x-sim-cache-write-tokens": "9", "x-sim-output-tokens": "15"}
    with ant(sim).messages.stream(
        model="claude-haiku-4-5", max_tokens=50, messages=USER, extra_headers=headers
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == reply_text("claude-haiku-4-5", 15)
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == PROMPT_TOKENS
    assert final.usage.output_tokens == 15
    assert (final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens) == (40, 9)


def test_anthropic_stream_wire_events(sim):
    raw = post(
        sim,
        "/anthropic/v1/messages",
        {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": USER, "stream": True},
        {"x-api-key": KEYS["anthropic"]},
    ).text
    names = [name for name, _ in sse_events(raw)]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    delta = json.loads(sse_events(raw)[-2][1])
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"] == {"output_tokens": 3}


def test_anthropic_count_tokens_and_models(sim):
    client = ant(sim)
    count = client.messages.count_tokens(model="claude-sonnet-4-6", messages=USER)
    assert count.input_tokens == PROMPT_TOKENS
    assert "claude-sonnet-4-6" in [m.id for m in client.models.list()]


# --------------------------------------------------------------------------
# Gemini
# --------------------------------------------------------------------------


def test_gemini_generate_content(sim):
    config = gem_config(**{"x-sim-cached-tokens": "5", "x-sim-reasoning-tokens": "11"})
    result = gem(sim).models.generate_content(model="gemini-2.5-flash", contents=PROMPT, config=config)
    assert result.text == reply_text("gemini-2.5-flash", 12)
    assert result.model_version == "gemini-2.5-flash"
    meta = result.usage_metadata
    assert meta.prompt_token_count == PROMPT_TOKENS + 5
    assert meta.cached_content_token_count == 5
    assert meta.candidates_token_count == 12
    assert meta.thoughts_token_count == 11
    assert meta.total_token_count == PROMPT_TOKENS + 5 + 12 + 11


def test_gemini_generate_content_stream(sim):
    config = gem_config(**{"x-sim-chunks": "4", "x-sim-cached-tokens": "2", "x-sim-reasoning-tokens": "3"})
    chunks = list(
        gem(sim).models.generate_content_stream(model="gemini-2.5-pro", contents=PROMPT, config=config)
    )
    assert len(chunks) == 4
    assert "".join(c.text for c in chunks) == reply_text("gemini-2.5-pro", 12)
    final = chunks[-1].usage_metadata
    assert (final.prompt_token_count, final.candidates_token_count) == (PROMPT_TOKENS + 2, 12)
    assert (final.cached_content_token_count, final.thoughts_token_count) == (2, 3)
    assert final.total_token_count == PROMPT_TOKENS + 2 + 12 + 3
    assert chunks[0].usage_metadata.candidates_token_count is None
    assert chunks[-1].candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert sim.requests[-1].query == "alt=sse"


def test_gemini_stream_wire_format(sim):
    headers = {"x-goog-api-key": KEYS["gemini"]}
    body = {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {"maxOutputTokens": 4},
    }
    raw = post(
        sim, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", body, headers
    ).text
    assert raw.startswith("data: {") and raw.endswith("}\r\n\r\n") and "\r\n\r\ndata: " in raw
    last = json.loads(sse_events(raw)[-1][1])
    assert last["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert last["usageMetadata"]["candidatesTokenCount"] == 4
    array = post(sim, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent", body, headers)
    assert array.headers["content-type"].startswith("application/json")
    parts = array.json()
    assert "".join(p["candidates"][0]["content"]["parts"][0]["text"] for p in parts) == reply_text(
        "gemini-2.5-flash", 4
    )


def test_gemini_embed_count_and_models(sim):
    client = gem(sim)
    vectors = client.models.embed_content(model="gemini-embedding-001", contents=["one", "two"])
    assert len(vectors.embeddings) == 2 and len(vectors.embeddings[0].values) == 16
    single = post(
        sim,
        "/gemini/v1beta/models/gemini-embedding-001:embedContent?key=" + KEYS["gemini"],
        {"content": {"parts": [{"text": "one"}]}},
    ).json()
    assert single["embedding"]["values"] == vectors.embeddings[0].values
    assert client.models.count_tokens(model="gemini-2.5-flash", contents=PROMPT).total_tokens == PROMPT_TOKENS
    assert "models/gemini-2.5-flash" in [m.name for m in client.models.list()]


# --------------------------------------------------------------------------
# Authentication and errors
# --------------------------------------------------------------------------


def test_wrong_key_is_401_in_each_format(sim):
    with pytest.raises(openai.AuthenticationError) as oe:
        oai(sim, key="sk-wrong").chat.completions.create(model="gpt-4o", messages=USER)
    assert oe.value.status_code == 401
    assert oe.value.body["code"] == "invalid_api_key" and oe.value.body["param"] is None
    with pytest.raises(anthropic.AuthenticationError) as ae:
        ant(sim, key="sk-ant-wrong").messages.create(model="claude-haiku-4-5", max_tokens=5, messages=USER)
    assert ae.value.status_code == 401
    assert ae.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Invalid API key provided."},
    }
    with pytest.raises(genai_errors.ClientError) as ge:
        gem(sim, key="gm-wrong").models.generate_content(model="gemini-2.5-flash", contents=PROMPT)
    assert (ge.value.code, ge.value.status) == (401, "UNAUTHENTICATED")


def test_missing_key_and_documented_headers(sim):
    assert post(sim, "/openai/v1/chat/completions", chat_body()).status_code == 401
    body = {"model": "claude-haiku-4-5", "max_tokens": 5, "messages": USER}
    assert post(sim, "/anthropic/v1/messages", body, {"x-api-key": KEYS["anthropic"]}).status_code == 200
    assert post(sim, "/anthropic/v1/messages", body).json()["error"]["type"] == "authentication_error"
    gemini = "/gemini/v1beta/models/gemini-2.5-flash:generateContent"
    assert post(sim, gemini + "?key=" + KEYS["gemini"], {"contents": []}).status_code == 200
    assert post(sim, gemini + "?key=bad", {"contents": []}).status_code == 401


def test_any_key_accepted_without_configured_keys():
    with Simulator() as open_sim:
        result = oai(open_sim, key="anything").chat.completions.create(model="gpt-4o", messages=USER)
        assert result.choices[0].message.content


def test_malformed_json_is_400_in_each_format(sim):
    auth = {
        "authorization": "Bearer " + KEYS["openai"],
        "x-api-key": KEYS["anthropic"],
        "x-goog-api-key": KEYS["gemini"],
    }
    cases = {
        "/openai/v1/chat/completions": lambda b: b["error"]["type"] == "invalid_request_error",
        "/anthropic/v1/messages": lambda b: (
            b["type"] == "error" and b["error"]["type"] == "invalid_request_error"
        ),
        "/gemini/v1beta/models/g:generateContent": lambda b: b["error"]["status"] == "INVALID_ARGUMENT",
    }
    for path, check in cases.items():
        response = post(sim, path, b"{not json", auth)
        assert response.status_code == 400 and check(response.json()), path
    assert sim.requests[0].body is None


def test_unknown_path_is_404(sim):
    response = httpx.get(sim.url + "/anthropic/v1/nothing", headers={"x-api-key": KEYS["anthropic"]})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# --------------------------------------------------------------------------
# Fault controls
# --------------------------------------------------------------------------

AUTH = {"authorization": "Bearer " + KEYS["openai"]}


def test_fault_status_in_each_format(sim):
    response = post(sim, "/openai/v1/chat/completions", chat_body(), {**AUTH, "x-sim-fault": "status:429"})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(anthropic.InternalServerError) as ae:
        ant(sim).messages.create(
            model="claude-haiku-4-5", max_tokens=5, messages=USER, extra_headers={"x-sim-fault": "status:529"}
        )
    assert ae.value.status_code == 529 and ae.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(genai_errors.ServerError) as ge:
        gem(sim).models.generate_content(
            model="gemini-2.5-flash", contents=PROMPT, config=gem_config(**{"x-sim-fault": "status:503"})
        )
    assert (ge.value.code, ge.value.status) == (503, "UNAVAILABLE")


def test_fault_no_usage(sim):
    headers = {"x-sim-fault": "no-usage"}
    result = oai(sim).chat.completions.create(model="gpt-4o", messages=USER, extra_headers=headers)
    assert result.usage is None and result.choices[0].message.content
    raw = post(
        sim,
        "/openai/v1/chat/completions",
        chat_body(stream=True, stream_options={"include_usage": True}),
        {**AUTH, **headers},
    ).text
    assert "usage" not in raw and raw.endswith("data: [DONE]\n\n")
    raw = post(
        sim,
        "/anthropic/v1/messages",
        {"model": "c", "messages": USER, "stream": True},
        {"x-api-key": KEYS["anthropic"], **headers},
    ).text
    assert "usage" not in raw and "message_stop" in raw
    chunks = list(
        gem(sim).models.generate_content_stream(
            model="gemini-2.5-flash", contents=PROMPT, config=gem_config(**headers)
        )
    )
    assert all(c.usage_metadata is None for c in chunks)


def test_fault_disconnect_mid_stream(sim):
    stream = oai(sim).chat.completions.create(
        model="gpt-4o", messages=USER, stream=True, extra_headers={"x-sim-fault": "disconnect-mid-stream"}
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert 1 <= len(received) <= 3
    with pytest.raises(httpx.HTTPError):
        post(
            sim, "/openai/v1/chat/completions", chat_body(), {**AUTH, "x-sim-fault": "disconnect-mid-stream"}
        )
    assert sim.cancelled_streams == 0  # a disconnect of our own is not a client cancellation


def test_fault_stall_and_client_cancellation(sim):
    before = sim.cancelled_streams
    headers = {**AUTH, "x-sim-fault": "stall"}
    started = time.monotonic()
    request = json.dumps(chat_body(stream=True))
    timeout = httpx.Timeout(5.0, read=0.5)
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream(
            "POST", sim.url + "/openai/v1/chat/completions", content=request, headers=headers, timeout=timeout
        ) as response,
    ):
        for _ in response.iter_bytes():
            pass
    assert time.monotonic() - started < 3
    assert _wait_for(lambda: sim.cancelled_streams == before + 1)


def test_client_going_away_stops_a_slow_stream(sim):
    before = sim.cancelled_streams
    headers = {"x-sim-chunks": "50", "x-sim-chunk-delay-ms": "100"}
    with ant(sim).messages.stream(
        model="claude-haiku-4-5", max_tokens=100, messages=USER, extra_headers=headers
    ) as stream:
        next(iter(stream.text_stream))
    assert _wait_for(lambda: sim.cancelled_streams == before + 1)


def test_fault_truncate(sim):
    headers = {**AUTH, "x-sim-fault": "truncate"}
    raw = post(
        sim,
        "/openai/v1/chat/completions",
        chat_body(stream=True, stream_options={"include_usage": True}),
        headers,
    ).text
    assert "[DONE]" not in raw and '"finish_reason":"stop"' not in raw and '"usage":{' not in raw
    raw = post(
        sim,
        "/anthropic/v1/messages",
        {"model": "c", "messages": USER, "stream": True},
        {"x-api-key": KEYS["anthropic"], "x-sim-fault": "truncate"},
    ).text
    assert "content_block_delta" in raw and "message_delta" not in raw and "message_stop" not in raw
    raw = post(
        sim,
        "/openai/v1/responses",
        {"model": "m", "input": "x", "stream": True},
        {**AUTH, "x-sim-fault": "truncate"},
    ).text
    assert "response.output_text.delta" in raw and "response.completed" not in raw


def test_fault_invalid_json(sim):
    response = post(sim, "/openai/v1/chat/completions", chat_body(), {**AUTH, "x-sim-fault": "invalid-json"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    with pytest.raises(ValueError):
        response.json()


def test_unknown_fault_is_rejected(sim):
    response = post(sim, "/openai/v1/chat/completions", chat_body(), {**AUTH, "x-sim-fault": "explode"})
    assert response.status_code == 400


def test_latency_and_chunk_delay(sim):
    started = time.monotonic()
    post(sim, "/openai/v1/models", b"", {**AUTH, "x-sim-latency-ms": "200"})
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    post(
        sim,
        "/openai/v1/chat/completions",
        chat_body(stream=True),
        {**AUTH, "x-sim-chunks": "4", "x-sim-chunk-delay-ms": "60"},
    )
    assert time.monotonic() - started >= 0.24


# --------------------------------------------------------------------------
# Billing controls
# --------------------------------------------------------------------------

ANT_AUTH = {"x-api-key": KEYS["anthropic"]}
GEM_AUTH = {"x-goog-api-key": KEYS["gemini"]}
GEMINI = "/gemini/v1beta/models/gemini-2.5-flash:"
GEM_BODY = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}


WITH_USAGE = {"include_usage": True}


def sse_payloads(raw: str) -> list[dict]:
    return [json.loads(d) for _, d in sse_events(raw) if d != "[DONE]"]


def openai_json(sim, path: str, body: dict, headers: dict) -> dict:
    return post(sim, "/openai/v1/" + path, body, {**AUTH, **headers}).json()


def openai_stream(sim, path: str, body: dict, headers: dict) -> list[dict]:
    raw = post(sim, "/openai/v1/" + path, {**body, "stream": True}, {**AUTH, **headers}).text
    return sse_payloads(raw)


def ant_body(**extra) -> dict:
    return {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": USER, **extra}


def ant_json(sim, headers: dict, **extra) -> dict:
    return post(sim, "/anthropic/v1/messages", ant_body(**extra), {**ANT_AUTH, **headers}).json()


def ant_events(sim, headers: dict) -> dict[str, dict]:
    """The events of an Anthropic stream by name (the last of each name)."""
    raw = post(sim, "/anthropic/v1/messages", ant_body(stream=True), {**ANT_AUTH, **headers}).text
    return {name: json.loads(data) for name, data in sse_events(raw)}


def gem_json(sim, headers: dict) -> dict:
    return post(sim, GEMINI + "generateContent", GEM_BODY, {**GEM_AUTH, **headers}).json()


def gem_streams(sim, headers: dict) -> tuple[list[dict], list[dict]]:
    """The chunks of a Gemini stream, as SSE and as a JSON array."""
    url, auth = GEMINI + "streamGenerateContent", {**GEM_AUTH, **headers}
    sse = sse_payloads(post(sim, url + "?alt=sse", GEM_BODY, auth).text)
    return sse, post(sim, url, GEM_BODY, auth).json()


def test_input_tokens_replace_the_prompt_count_openai(sim):
    headers = {"x-sim-input-tokens": "250000", "x-sim-cached-tokens": "1000"}
    result = oai(sim).chat.completions.create(model="gpt-4o", messages=USER, extra_headers=headers)
    assert result.usage.prompt_tokens == 251_000 and result.usage.prompt_tokens_details.cached_tokens == 1000
    assert result.usage.total_tokens == 251_000 + 12
    chunks = openai_stream(sim, "chat/completions", chat_body(stream_options=WITH_USAGE), headers)
    assert chunks[-1]["usage"]["prompt_tokens"] == 251_000
    body = {"model": "gpt-4.1", "input": PROMPT}
    assert openai_json(sim, "responses", body, headers)["usage"]["input_tokens"] == 251_000
    final = openai_stream(sim, "responses", body, headers)[-1]
    assert final["type"] == "response.completed" and final["response"]["usage"]["input_tokens"] == 251_000
    fallback = openai_json(sim, "chat/completions", chat_body(), {"x-sim-input-tokens": "lots"})
    assert fallback["usage"]["prompt_tokens"] == PROMPT_TOKENS


def test_input_tokens_replace_the_prompt_count_anthropic_and_gemini(sim):
    headers = {"x-sim-input-tokens": "250000", "x-sim-cached-tokens": "1000"}
    usage = ant_json(sim, headers)["usage"]
    assert (usage["input_tokens"], usage["cache_read_input_tokens"]) == (250_000, 1000)
    start = ant_events(sim, headers)["message_start"]["message"]["usage"]
    assert (start["input_tokens"], start["cache_read_input_tokens"]) == (250_000, 1000)
    meta = gem_json(sim, headers)["usageMetadata"]
    assert (meta["promptTokenCount"], meta["cachedContentTokenCount"]) == (251_000, 1000)
    assert meta["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": 251_000}]
    for chunks in gem_streams(sim, headers):
        assert [c["usageMetadata"]["promptTokenCount"] for c in chunks] == [251_000] * len(chunks)
    assert gem_json(sim, {"x-sim-input-tokens": "-"})["usageMetadata"]["promptTokenCount"] == PROMPT_TOKENS


def test_anthropic_cache_write_1h_tokens(sim):
    headers = {"x-sim-cache-write-tokens": "7", "x-sim-cache-write-1h-tokens": "30"}
    expected = {"ephemeral_5m_input_tokens": 7, "ephemeral_1h_input_tokens": 30}
    usage = ant_json(sim, headers)["usage"]
    assert usage["cache_creation_input_tokens"] == 37 and usage["cache_creation"] == expected
    start = ant_events(sim, headers)["message_start"]["message"]["usage"]
    assert start["cache_creation_input_tokens"] == 37 and start["cache_creation"] == expected
    with ant(sim).messages.stream(
        model="claude-haiku-4-5", max_tokens=50, messages=USER, extra_headers=headers
    ) as stream:
        final = stream.get_final_message().usage
    assert final.cache_creation_input_tokens == 37 and final.cache_creation.ephemeral_1h_input_tokens == 30
    zeros = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
    assert ant_json(sim, {"x-sim-cache-write-1h-tokens": "soon"})["usage"]["cache_creation"] == zeros
    assert ant_events(sim, {})["message_start"]["message"]["usage"]["cache_creation"] == zeros


def test_openai_service_tier(sim):
    tiers = {None: "default", "auto": "default", "flex": "flex", "priority": "priority", "bogus": "default"}
    for asked, reported in tiers.items():
        body = chat_body() if asked is None else chat_body(service_tier=asked)
        assert openai_json(sim, "chat/completions", body, {})["service_tier"] == reported, asked
    header = {"x-sim-service-tier": "scale"}
    overridden = openai_json(sim, "chat/completions", chat_body(service_tier="flex"), header)
    assert overridden["service_tier"] == "scale"
    chunks = openai_stream(sim, "chat/completions", chat_body(service_tier="flex"), {})
    assert {c["service_tier"] for c in chunks} == {"flex"}
    body = {"model": "gpt-4.1", "input": PROMPT, "service_tier": "priority"}
    assert openai_json(sim, "responses", body, {})["service_tier"] == "priority"
    events = {e["type"]: e for e in openai_stream(sim, "responses", body, header)}
    assert events["response.created"]["response"]["service_tier"] == "scale"
    assert events["response.completed"]["response"]["service_tier"] == "scale"
    result = oai(sim).responses.create(model="gpt-4.1", input=PROMPT, service_tier="flex")
    assert result.service_tier == "flex"


def test_anthropic_and_gemini_service_tier(sim):
    assert ant_json(sim, {})["usage"]["service_tier"] == "standard"
    header = {"x-sim-service-tier": "priority"}
    assert ant_json(sim, header)["usage"]["service_tier"] == "priority"
    assert ant_events(sim, header)["message_start"]["message"]["usage"]["service_tier"] == "priority"
    message = ant(sim).messages.create(
        model="claude-haiku-4-5", max_tokens=5, messages=USER, extra_headers=header
    )
    assert message.usage.service_tier == "priority"
    assert "service_tier" not in json.dumps(gem_json(sim, header))


def usage_searches(count: int) -> dict:
    return {"server_tool_use": {"web_search_requests": count}}


def test_anthropic_web_searches(sim):
    header = {"x-sim-web-searches": "3"}
    usage = ant_json(sim, header)["usage"]
    assert usage["output_tokens"] == 12 and usage["server_tool_use"] == {"web_search_requests": 3}
    assert "server_tool_use" not in ant_json(sim, {})["usage"]
    events = ant_events(sim, header)
    assert events["message_delta"]["usage"] == {"output_tokens": 12, **usage_searches(3)}
    assert "server_tool_use" not in events["message_start"]["message"]["usage"]
    with ant(sim).messages.stream(
        model="claude-haiku-4-5", max_tokens=50, messages=USER, extra_headers=header
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.server_tool_use.web_search_requests == 3 and final.usage.output_tokens == 12


def _search_item(item: dict, index: int, status: str = "completed") -> None:
    assert item["id"].startswith("ws_") and item["type"] == "web_search_call"
    assert item["status"] == status
    assert item["action"] == {"type": "search", "query": f"simulated query {index}"}


def test_openai_responses_web_searches(sim):
    header, body = {"x-sim-web-searches": "2"}, {"model": "gpt-4.1", "input": PROMPT}
    output = openai_json(sim, "responses", body, header)["output"]
    assert [o["type"] for o in output] == ["web_search_call", "web_search_call", "message"]
    _search_item(output[0], 1)
    _search_item(output[1], 2)
    events = openai_stream(sim, "responses", body, header)
    final = events[-1]["response"]["output"]
    assert [o["type"] for o in final] == ["web_search_call", "web_search_call", "message"]
    _search_item(final[1], 2)
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [
        (0, "web_search_call"),
        (1, "web_search_call"),
        (2, "message"),
    ]
    _search_item(added[0]["item"], 1, "in_progress")
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert {e["output_index"] for e in deltas} == {2}
    with oai(sim).responses.stream(model="gpt-4.1", input=PROMPT, extra_headers=header) as stream:
        for _ in stream:
            pass
        response = stream.get_final_response()
    assert [o.type for o in response.output] == ["web_search_call", "web_search_call", "message"]
    assert response.output_text == reply_text("gpt-4.1", 12)
    assert "web_search" not in json.dumps(openai_json(sim, "chat/completions", chat_body(), header))


def test_gemini_web_searches(sim):
    header = {"x-sim-web-searches": "2"}
    grounding = {
        "webSearchQueries": ["simulated query 1", "simulated query 2"],
        "groundingChunks": [],
        "searchEntryPoint": {"renderedContent": ""},
    }
    assert gem_json(sim, header)["candidates"][-1]["groundingMetadata"] == grounding
    assert "groundingMetadata" not in gem_json(sim, {})["candidates"][-1]
    for chunks in gem_streams(sim, header):
        assert chunks[-1]["candidates"][-1]["groundingMetadata"] == grounding
        assert all("groundingMetadata" not in c["candidates"][-1] for c in chunks[:-1])
    result = gem(sim).models.generate_content(
        model="gemini-2.5-flash", contents=PROMPT, config=gem_config(**header)
    )
    assert result.candidates[0].grounding_metadata.web_search_queries == grounding["webSearchQueries"]


def test_openai_audio_tokens(sim):
    headers = {"x-sim-audio-input-tokens": "4", "x-sim-audio-output-tokens": "5", "x-sim-cached-tokens": "2"}
    usage = openai_json(sim, "chat/completions", chat_body(), headers)["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT_TOKENS + 2, 12)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2, "audio_tokens": 4}
    assert usage["completion_tokens_details"]["audio_tokens"] == 5
    chunks = openai_stream(sim, "chat/completions", chat_body(stream_options=WITH_USAGE), headers)
    assert chunks[-1]["usage"] == usage
    result = oai(sim).chat.completions.create(model="gpt-4o", messages=USER, extra_headers=headers)
    assert result.usage.completion_tokens_details.audio_tokens == 5
    responses = openai_json(sim, "responses", {"model": "gpt-4.1", "input": PROMPT}, headers)["usage"]
    assert "audio" not in json.dumps(responses)
    capped = openai_json(sim, "chat/completions", chat_body(), {"x-sim-audio-input-tokens": "999"})["usage"]
    assert capped["prompt_tokens_details"]["audio_tokens"] == capped["prompt_tokens"] == PROMPT_TOKENS


def test_gemini_audio_tokens(sim):
    headers = {"x-sim-input-tokens": "100", "x-sim-audio-input-tokens": "60"}
    headers["x-sim-audio-output-tokens"] = "5"
    prompt = [{"modality": "TEXT", "tokenCount": 40}, {"modality": "AUDIO", "tokenCount": 60}]
    output = [{"modality": "TEXT", "tokenCount": 7}, {"modality": "AUDIO", "tokenCount": 5}]
    meta = gem_json(sim, headers)["usageMetadata"]
    assert (meta["promptTokenCount"], meta["candidatesTokenCount"]) == (100, 12)
    assert meta["promptTokensDetails"] == prompt and meta["candidatesTokensDetails"] == output
    for chunks in gem_streams(sim, headers):
        assert chunks[0]["usageMetadata"]["promptTokensDetails"] == prompt
        assert "candidatesTokensDetails" not in chunks[0]["usageMetadata"]
        assert chunks[-1]["usageMetadata"]["candidatesTokensDetails"] == output
    text_only = gem_json(sim, {"x-sim-audio-output-tokens": "12"})["usageMetadata"]
    assert text_only["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": PROMPT_TOKENS}]
    assert text_only["candidatesTokensDetails"] == [
        {"modality": "TEXT", "tokenCount": 0},
        {"modality": "AUDIO", "tokenCount": 12},
    ]
    assert "candidatesTokensDetails" not in gem_json(sim, {})["usageMetadata"]
    assert "audio" not in json.dumps(ant_json(sim, headers)).lower()


def test_response_model(sim):
    alias, snapshot = "chatgpt-4o-latest", "gpt-4o-2024-11-20"
    header = {"x-sim-response-model": snapshot}
    body = chat_body(model=alias)
    assert openai_json(sim, "chat/completions", body, header)["model"] == snapshot
    assert {c["model"] for c in openai_stream(sim, "chat/completions", body, header)} == {snapshot}
    body = {"model": alias, "input": PROMPT}
    assert openai_json(sim, "responses", body, header)["model"] == snapshot
    events = {e["type"]: e for e in openai_stream(sim, "responses", body, header)}
    assert events["response.created"]["response"]["model"] == snapshot
    assert events["response.completed"]["response"]["model"] == snapshot
    result = oai(sim).chat.completions.create(model=alias, messages=USER, extra_headers=header)
    assert result.model == snapshot and result.choices[0].message.content == reply_text(alias, 12)
    claude = {"x-sim-response-model": "claude-haiku-4-5-20251001"}
    assert ant_json(sim, claude)["model"] == "claude-haiku-4-5-20251001"
    assert ant_events(sim, claude)["message_start"]["message"]["model"] == "claude-haiku-4-5-20251001"
    gemini = {"x-sim-response-model": "gemini-2.5-flash-preview-09-2025"}
    assert gem_json(sim, gemini)["modelVersion"] == "gemini-2.5-flash-preview-09-2025"
    for chunks in gem_streams(sim, gemini):
        assert {c["modelVersion"] for c in chunks} == {"gemini-2.5-flash-preview-09-2025"}
    assert gem_json(sim, {"x-sim-response-model": ""})["modelVersion"] == "gemini-2.5-flash"


def test_billing_controls_without_usage(sim):
    """The no-usage fault drops the usage, not the search results the reply shows."""
    headers = {"x-sim-fault": "no-usage", "x-sim-web-searches": "1"}
    result = openai_json(sim, "responses", {"model": "gpt-4.1", "input": PROMPT}, headers)
    assert result["usage"] is None and result["output"][0]["type"] == "web_search_call"
    assert "usage" not in ant_json(sim, headers)
    gemini = gem_json(sim, headers)
    assert "usageMetadata" not in gemini and "groundingMetadata" in gemini["candidates"][0]


# --------------------------------------------------------------------------
# Recording and control endpoints
# --------------------------------------------------------------------------


def test_recorded_requests_show_headers_and_body(sim):
    oai(sim).chat.completions.create(model="gpt-4o", messages=USER, extra_headers={"X-Sim-Chunks": "3"})
    gem(sim).models.generate_content(model="gemini-2.5-flash", contents=PROMPT)
    first, second = sim.requests
    assert isinstance(first, SimRequest)
    assert (first.provider, first.method, first.path) == ("openai", "POST", "/v1/chat/completions")
    assert first.headers["authorization"] == "Bearer " + KEYS["openai"]
    assert first.headers["x-sim-chunks"] == "3"
    assert first.body == {"model": "gpt-4o", "messages": USER}
    assert second.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert second.headers["x-goog-api-key"] == KEYS["gemini"]
    listed = httpx.get(sim.url + "/_sim/requests").json()
    assert [r["path"] for r in listed] == [first.path, second.path]
    assert httpx.get(sim.url + "/_sim/health").json()["status"] == "ok"
    assert httpx.delete(sim.url + "/_sim/requests").json() == {"cleared": 2}
    assert sim.requests == []


def test_no_record():
    with Simulator(record=False) as quiet:
        oai(quiet).models.list()
        assert quiet.requests == []


def test_split_text_keeps_content():
    text = reply_text("m", 12)
    for parts in (1, 5, 12, 40):
        pieces = split_text(text, parts)
        assert "".join(pieces) == text and len(pieces) == parts


def test_command_line_serves_until_sigterm():
    command = [sys.executable, "-m", "proxy.simulator", "--port", "0", "--key", "openai=sk-cli"]
    root = Path(__file__).resolve().parents[1]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=root) as process:
        try:
            line = process.stderr.readline()
            match = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
            assert match, line
            client = openai.OpenAI(base_url=match.group(1) + "/openai/v1", api_key="sk-cli", max_retries=0)
            assert client.chat.completions.create(model="gpt-4o", messages=USER).usage.completion_tokens == 12
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0


# --------------------------------------------------------------------------
# Recorded fixtures
# --------------------------------------------------------------------------


def _fixture_text_and_usage(name: str, raw: str):
    events = sse_events(raw)
    payloads = [json.loads(d) for _, d in events if d != "[DONE]"]
    if name.startswith("openai_chat"):
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])
        return text, next((p["usage"] for p in payloads if p.get("usage")), None)
    if name.startswith("openai_responses"):
        text = "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
        return text, payloads[-1]["response"]["usage"]
    if name.startswith("anthropic"):
        text = "".join(p["delta"]["text"] for p in payloads if p["type"] == "content_block_delta")
        start = payloads[0]["message"]["usage"]
        usage = {
            k: start[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        }
        usage["output_tokens"] = next(p for p in payloads if p["type"] == "message_delta")["usage"][
            "output_tokens"
        ]
        return text, usage
    text = "".join(p["candidates"][0]["content"]["parts"][0]["text"] for p in payloads)
    final = payloads[-1]["usageMetadata"]
    return text, {
        k: final[k]
        for k in (
            "promptTokenCount",
            "candidatesTokenCount",
            "totalTokenCount",
            "cachedContentTokenCount",
            "thoughtsTokenCount",
        )
    }


def test_recorded_fixtures_match_expected_usage():
    expected = json.loads((FIXTURES / "expected_usage.json").read_text())
    assert set(expected) <= {p.name for p in FIXTURES.glob("*.sse")}
    for name, info in expected.items():
        raw = (FIXTURES / name).read_bytes().decode()
        assert ("\r\n" in raw) == (info["provider"] == "gemini"), name
        text, usage = _fixture_text_and_usage(name, raw)
        assert text == info["text"], name
        assert usage == info["usage"], name
