"""Provider adapters: usage from recorded streams under any chunking, request inspection,
client credentials, error bodies and usage from whole response bodies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import (
    BadRequest,
    BodyTooLarge,
    BudgetExceeded,
    Forbidden,
    NoRoute,
    PolicyDenied,
    RateLimited,
    StoreUnavailable,
    TollwayError,
    Unauthenticated,
    UnknownProvider,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.base import Adapter, CallInfo, Usage
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import AzureAdapter, OpenAIAdapter
from proxy.sse import SseEvent, SseParser

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected_usage.json").read_text())

OPENAI, ANTHROPIC, GEMINI, AZURE = OpenAIAdapter(), AnthropicAdapter(), GeminiAdapter(), AzureAdapter()


# --- expected numbers, converted to canonical meaning independently of the adapters -----------------
#: The counts every fixture reports; the other dimensions are tested on their own below.
CORE = ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens")


def core(usage: Usage) -> Usage:
    return Usage(**{name: getattr(usage, name) for name in CORE})


def canonical(provider: str, api: str, raw: dict | None) -> Usage:
    if raw is None:
        return Usage()
    if provider == "openai" and api == "chat.completions":
        return Usage(input_tokens=raw["prompt_tokens"], output_tokens=raw["completion_tokens"],
                     cached_input_tokens=raw["prompt_tokens_details"]["cached_tokens"],
                     reasoning_tokens=raw["completion_tokens_details"]["reasoning_tokens"])
    if provider == "openai" and api == "responses":
        return Usage(input_tokens=raw["input_tokens"], output_tokens=raw["output_tokens"],
                     cached_input_tokens=raw["input_tokens_details"]["cached_tokens"],
                     reasoning_tokens=raw["output_tokens_details"]["reasoning_tokens"])
    if provider == "anthropic":  # input_tokens excludes the cache reads and writes
        read, write = raw["cache_read_input_tokens"], raw["cache_creation_input_tokens"]
        return Usage(input_tokens=raw["input_tokens"] + read + write, output_tokens=raw["output_tokens"],
                     cached_input_tokens=read, cache_write_tokens=write)
    if provider == "gemini":  # the prompt includes cached tokens; thoughts are billed as output
        thoughts = raw.get("thoughtsTokenCount", 0)
        return Usage(input_tokens=raw["promptTokenCount"] + raw.get("toolUsePromptTokenCount", 0),
                     output_tokens=raw["candidatesTokenCount"] + thoughts,
                     cached_input_tokens=raw.get("cachedContentTokenCount"), reasoning_tokens=thoughts)
    raise AssertionError(f"no conversion for {provider} {api}")


def adapter_and_info(name: str, hide_usage_event: bool = False) -> tuple[Adapter, CallInfo]:
    meta = EXPECTED[name]
    provider, api = meta["provider"], meta["api"]
    if provider == "openai":
        endpoint = "chat/completions" if api == "chat.completions" else api
        return OPENAI, CallInfo(meta["model"], True, endpoint, hide_usage_event=hide_usage_event)
    if provider == "anthropic":
        return ANTHROPIC, CallInfo(meta["model"], True, "messages")
    return GEMINI, CallInfo(meta["model"], True, "streamGenerateContent")


def run_stream(name: str, chunks: list[bytes], hide_usage_event: bool = False):
    """Relay `chunks` like the forwarder: parser + tap; return usage, text chars, passed and held events."""
    adapter, info = adapter_and_info(name, hide_usage_event)
    tap = adapter.stream_tap(info)
    parser = SseParser()
    passed: list[SseEvent] = []
    held: list[SseEvent] = []
    for chunk in chunks:
        for event in parser.feed(chunk):
            (passed if tap.feed(event) else held).append(event)
    for event in parser.close():
        (passed if tap.feed(event) else held).append(event)
    return tap.usage, tap.text_chars, passed, held


FIXTURE_NAMES = sorted(EXPECTED)


def test_every_fixture_file_has_expected_numbers():
    assert sorted(p.name for p in FIXTURES.glob("*.sse")) == FIXTURE_NAMES


def test_canonical_conversion_by_hand():
    """The conversions above, spelled out once with the recorded figures."""
    assert canonical("anthropic", "messages", EXPECTED["anthropic_messages_stream.sse"]["usage"]) == Usage(
        input_tokens=27 + 6120 + 1843, output_tokens=31, cached_input_tokens=6120, cache_write_tokens=1843)
    assert canonical("gemini", "streamGenerateContent", EXPECTED["gemini_stream.sse"]["usage"]) == Usage(
        input_tokens=4521, output_tokens=23 + 417, cached_input_tokens=4096, reasoning_tokens=417)
    assert canonical("openai", "chat.completions", EXPECTED["openai_chat_stream.sse"]["usage"]) == Usage(
        input_tokens=1311, output_tokens=214, cached_input_tokens=1152, reasoning_tokens=192)
    assert canonical("openai", "responses", EXPECTED["openai_responses_stream.sse"]["usage"]) == Usage(
        input_tokens=2093, output_tokens=358, cached_input_tokens=1920, reasoning_tokens=320)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_usage_whole(name):
    meta = EXPECTED[name]
    data = (FIXTURES / name).read_bytes()
    usage, chars, passed, held = run_stream(name, [data])
    assert core(usage) == canonical(meta["provider"], meta["api"], meta["usage"])
    assert usage.reported is (meta["usage"] is not None)
    assert chars == len(meta["text"])
    assert held == []
    assert b"".join(e.raw for e in passed) == data  # untouched passthrough


@pytest.mark.parametrize("hide", [False, True], ids=["plain", "hide-usage"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_usage_split_at_every_byte(name, hide):
    meta = EXPECTED[name]
    expected = canonical(meta["provider"], meta["api"], meta["usage"])
    data = (FIXTURES / name).read_bytes()
    reference = run_stream(name, [data], hide)
    for i in range(len(data) + 1):
        usage, chars, passed, held = run_stream(name, [data[:i], data[i:]], hide)
        assert core(usage) == expected, f"split at byte {i}"
        assert chars == len(meta["text"]), f"split at byte {i}"
        assert (passed, held) == (reference[2], reference[3]), f"split at byte {i}"


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(FIXTURE_NAMES), hide=st.booleans(), data=st.data())
def test_fixture_usage_random_multi_chunk_splits(name, hide, data):
    meta = EXPECTED[name]
    raw = (FIXTURES / name).read_bytes()
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), min_size=1, max_size=60))))
    points = [0, *cuts, len(raw)]
    chunks = [raw[a:b] for a, b in zip(points, points[1:], strict=False)]
    usage, chars, passed, held = run_stream(name, chunks, hide)
    assert core(usage) == canonical(meta["provider"], meta["api"], meta["usage"])
    assert chars == len(meta["text"])
    hides = hide and meta["provider"] == "openai"
    assert held == ([e for e in SseParser().feed(raw) if _is_usage_only(e)] if hides else [])
    assert b"".join(e.raw for e in passed) == raw.replace(b"".join(e.raw for e in held), b"")


def test_fixture_usage_one_byte_chunks():
    for name in FIXTURE_NAMES:
        meta = EXPECTED[name]
        raw = (FIXTURES / name).read_bytes()
        usage, *_ = run_stream(name, [raw[i:i + 1] for i in range(len(raw))])
        assert core(usage) == canonical(meta["provider"], meta["api"], meta["usage"]), name


# --- the injected usage chunk -----------------------------------------------------------------------
def _is_usage_only(event: SseEvent) -> bool:
    if not event.data or event.data == b"[DONE]":
        return False
    payload = json.loads(event.data)
    return not payload.get("choices") and bool(payload.get("usage"))


def test_hide_usage_event_drops_exactly_the_usage_only_chunk():
    name = "openai_chat_stream.sse"
    data = (FIXTURES / name).read_bytes()
    all_events = SseParser().feed(data)
    usage_only = [e for e in all_events if _is_usage_only(e)]
    assert len(usage_only) == 1

    usage, _, passed, held = run_stream(name, [data], hide_usage_event=True)
    assert held == usage_only
    assert passed == [e for e in all_events if e != usage_only[0]]
    assert passed[0].data == b"" and passed[0].raw.startswith(b":")  # the keep-alive comment stays
    assert passed[-1].data == b"[DONE]"  # so does the terminator
    assert b"".join(e.raw for e in passed) == data.replace(usage_only[0].raw, b"")
    assert usage.input_tokens == 1311  # and its figures are still read


def test_hide_usage_event_keeps_a_stream_without_usage_whole():
    name = "openai_chat_stream_no_usage.sse"
    data = (FIXTURES / name).read_bytes()
    usage, _, passed, held = run_stream(name, [data], hide_usage_event=True)
    assert held == []
    assert b"".join(e.raw for e in passed) == data
    assert not usage.reported


def test_hide_usage_event_keeps_a_chunk_with_choices_and_usage():
    tap = OPENAI.stream_tap(CallInfo("gpt-4o-mini", True, "chat/completions", hide_usage_event=True))
    event = SseParser().feed(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}],'
                             b'"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n')[0]
    assert tap.feed(event) is True
    assert (tap.usage.input_tokens, tap.usage.output_tokens) == (3, 1)


def test_without_hide_the_usage_chunk_passes():
    tap = OPENAI.stream_tap(CallInfo("gpt-4o-mini", True, "chat/completions"))
    event = SseParser().feed(b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n')[0]
    assert tap.feed(event) is True


@pytest.mark.parametrize("adapter", [OPENAI, ANTHROPIC, GEMINI], ids=["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("raw", [b"data: [DONE]\n\n", b"data: not json\n\n", b": ping\n\n", b"data: [1, 2]\n\n",
                                 b"data: \"str\"\n\n", b"event: x\n\n"])
def test_taps_pass_non_usage_events_untouched(adapter, raw):
    tap = adapter.stream_tap(CallInfo("m", True, "x", hide_usage_event=True))
    [event] = SseParser().feed(raw)
    assert tap.feed(event) is True
    assert not tap.usage.reported


# --- Anthropic stream refinements ---------------------------------------------------------------------
_ANTHROPIC_START = (b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
                    b'{"input_tokens":27,"cache_creation_input_tokens":1843,"cache_read_input_tokens":6120,'
                    b'"output_tokens":1}}}\n\n')


def _anthropic_usage(stream: bytes) -> Usage:
    tap = ANTHROPIC.stream_tap(CallInfo("claude-sonnet-4-5", True, "messages"))
    parser = SseParser()
    for event in parser.feed(stream) + parser.close():
        tap.feed(event)
    return tap.usage


def test_anthropic_message_delta_with_every_input_figure():
    usage = _anthropic_usage(_ANTHROPIC_START + (
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":27,'
        b'"cache_creation_input_tokens":1843,"cache_read_input_tokens":6120,"output_tokens":31}}\n\n'))
    assert core(usage) == Usage(input_tokens=7990, output_tokens=31, cached_input_tokens=6120, cache_write_tokens=1843)


def test_anthropic_message_delta_repeating_only_input_tokens_keeps_the_cache_figures():
    """A delta that repeats `input_tokens` but not the cache fields leaves those unchanged
    (the official SDKs merge message_delta usage field by field), so canonical input still
    includes the cache reads and writes reported by message_start."""
    usage = _anthropic_usage(_ANTHROPIC_START + (
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":27,"output_tokens":31}}\n\n'))
    assert core(usage) == Usage(input_tokens=7990, output_tokens=31, cached_input_tokens=6120, cache_write_tokens=1843)
    assert usage.input_tokens >= usage.cached_input_tokens + usage.cache_write_tokens


def test_anthropic_stream_cut_before_message_delta_still_has_the_input_side():
    usage = _anthropic_usage(_ANTHROPIC_START)
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens) == (7990, 6120, 1843)
    assert usage.output_tokens in (None, 1)  # message_start's output figure is only a placeholder


def test_gemini_stream_latest_usage_metadata_wins():
    tap = GEMINI.stream_tap(CallInfo("gemini-2.5-flash", True, "streamGenerateContent"))
    parser = SseParser()
    stream = (b'data: {"candidates":[{"content":{"parts":[{"text":"ab"}]}}],'
              b'"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":1}}\r\n\r\n'
              b'data: {"candidates":[{"content":{"parts":[{"text":"cd"}]}}],'
              b'"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":5,"toolUsePromptTokenCount":3}}\r\n\r\n')
    for event in parser.feed(stream):
        tap.feed(event)
    assert core(tap.usage) == Usage(input_tokens=13, output_tokens=5)
    assert tap.text_chars == 4


# --- inspect: OpenAI ----------------------------------------------------------------------------------
def test_openai_inspect_injects_include_usage_for_streamed_chat():
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "héllo ✓"}],
            "temperature": 0.1, "x_vendor_field": {"nested": [1, 2.5, None, True]}, "n": 12345678901234}
    original = json.loads(json.dumps(body))
    info = OPENAI.inspect("POST", "/v1/chat/completions", body, json.dumps(body).encode())
    assert info.model == "gpt-4o-mini"
    assert info.stream is True
    assert info.endpoint == "chat/completions"
    assert info.hide_usage_event is True
    assert info.metered is True
    sent = json.loads(info.body)
    assert sent.pop("stream_options") == {"include_usage": True}
    assert sent == original  # every other field, unknown ones included, survives unchanged


def test_openai_inspect_keeps_other_stream_options():
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [],
            "stream_options": {"include_obfuscation": False}}
    info = OPENAI.inspect("POST", "/v1/chat/completions", body, b"")
    assert json.loads(info.body)["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert info.hide_usage_event is True


def test_openai_inspect_injects_for_legacy_completions():
    info = OPENAI.inspect("POST", "/v1/completions", {"model": "gpt-3.5-turbo-instruct", "stream": True,
                                                      "prompt": "hi"}, b"")
    assert info.endpoint == "completions"
    assert json.loads(info.body)["stream_options"] == {"include_usage": True}


def test_openai_inspect_leaves_a_stream_that_asked_for_usage_alone():
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [], "stream_options": {"include_usage": True}}
    info = OPENAI.inspect("POST", "/v1/chat/completions", body, b"raw")
    assert info.body is None  # the client's bytes go upstream unchanged
    assert info.hide_usage_event is False
    assert info.stream is True


@pytest.mark.parametrize("path, body, stream", [
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": []}, False),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [], "stream": False}, False),
    ("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": [], "stream": "true"}, False),
    ("/v1/responses", {"model": "o4-mini", "input": "hi", "stream": True}, True),
    ("/v1/responses", {"model": "o4-mini", "input": "hi"}, False),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, False),
])
def test_openai_inspect_does_not_rewrite_other_calls(path, body, stream):
    info = OPENAI.inspect("POST", path, dict(body), b"raw")
    assert info.body is None
    assert info.hide_usage_event is False
    assert info.stream is stream
    assert info.model == body["model"]
    assert info.endpoint == path.removeprefix("/v1/")


@pytest.mark.parametrize("adapter", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])
@pytest.mark.parametrize("body", [None, {}, {"model": None}, {"model": 4}, {"model": ""}, {"model": "   "},
                                  {"model": ["gpt-4o"]}, {"messages": []}])
def test_missing_or_non_string_model_is_a_bad_request(adapter, body):
    path = "/v1/messages" if adapter is ANTHROPIC else "/v1/chat/completions"
    with pytest.raises(BadRequest) as caught:
        adapter.inspect("POST", path, body, b"")
    assert "model" in caught.value.message
    assert caught.value.status == 400


def test_openai_inspect_path_without_endpoint_is_a_bad_request():
    with pytest.raises(BadRequest):
        OPENAI.inspect("POST", "/v1", {"model": "gpt-4o-mini"}, b"")


def test_azure_inspect_takes_the_model_from_the_deployment():
    body = {"stream": True, "messages": []}
    info = AZURE.inspect("POST", "/openai/deployments/prod-gpt4o/chat/completions", body, b"")
    assert (info.model, info.endpoint, info.stream, info.hide_usage_event) == (
        "prod-gpt4o", "chat/completions", True, True)
    assert json.loads(info.body)["stream_options"] == {"include_usage": True}


# --- inspect: Anthropic -------------------------------------------------------------------------------
def test_anthropic_inspect_messages():
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [], "stream": True}
    info = ANTHROPIC.inspect("POST", "/v1/messages", body, b"raw")
    assert (info.model, info.stream, info.endpoint, info.metered, info.body) == (
        "claude-sonnet-4-5", True, "messages", True, None)
    assert info.hide_usage_event is False


def test_anthropic_inspect_non_streamed():
    info = ANTHROPIC.inspect("POST", "/v1/messages", {"model": "claude-haiku-4-5", "messages": []}, b"")
    assert info.stream is False
    assert info.metered is True


def test_anthropic_count_tokens_is_not_metered():
    info = ANTHROPIC.inspect("POST", "/v1/messages/count_tokens", {"model": "claude-sonnet-4-5", "messages": []}, b"")
    assert info.endpoint == "messages/count_tokens"
    assert info.metered is False
    assert info.stream is False


# --- inspect: Gemini ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, model, verb, stream, metered", [
    ("/v1beta/models/gemini-2.5-flash:generateContent", "gemini-2.5-flash", "generateContent", False, True),
    ("/v1beta/models/gemini-2.5-flash:streamGenerateContent", "gemini-2.5-flash", "streamGenerateContent", True, True),
    ("/v1/models/gemini-2.5-pro:generateContent", "gemini-2.5-pro", "generateContent", False, True),
    ("/v1beta/models/gemini-embedding-001:embedContent", "gemini-embedding-001", "embedContent", False, True),
    ("/v1beta/models/gemini-2.5-flash:countTokens", "gemini-2.5-flash", "countTokens", False, False),
    ("/v1beta/tunedModels/my-tuned-1:generateContent", "my-tuned-1", "generateContent", False, True),
])
def test_gemini_inspect_reads_model_and_verb_from_the_path(path, model, verb, stream, metered):
    info = GEMINI.inspect("POST", path, {"contents": []}, b"raw")
    assert (info.model, info.endpoint, info.stream, info.metered, info.body) == (model, verb, stream, metered, None)


def test_gemini_inspect_ignores_a_model_field_in_the_body():
    info = GEMINI.inspect("POST", "/v1beta/models/gemini-2.5-flash:generateContent",
                          {"model": "gemini-2.5-pro", "contents": []}, b"")
    assert info.model == "gemini-2.5-flash"


@pytest.mark.parametrize("path", [
    "/v1beta/models/gemini-2.5-flash",
    "/v1beta/models:generateContent",
    "/v1beta/files/abc",
    "/v1beta/models/a/b:generateContent",
    "/v1beta/models/gemini-2.5-flash:",
    "/v2/models/gemini-2.5-flash:generateContent",
    "",
])
def test_gemini_inspect_bad_path_is_a_bad_request(path):
    with pytest.raises(BadRequest):
        GEMINI.inspect("POST", path, {"contents": []}, b"")


def test_gemini_inspect_without_a_json_body_is_a_bad_request():
    with pytest.raises(BadRequest):
        GEMINI.inspect("POST", "/v1beta/models/gemini-2.5-flash:generateContent", None, b"")


# --- client credentials ---------------------------------------------------------------------------------
@pytest.mark.parametrize("adapter, headers, query, expected", [
    (OPENAI, {"authorization": "Bearer tw_abc"}, {}, "tw_abc"),
    (OPENAI, {"authorization": "bearer tw_abc "}, {}, "tw_abc"),
    (OPENAI, {"authorization": "BEARER   tw_abc"}, {}, "tw_abc"),
    (OPENAI, {"x-api-key": "tw_abc"}, {}, None),
    (OPENAI, {}, {"key": "tw_abc"}, None),
    (OPENAI, {}, {}, None),
    (OPENAI, {"authorization": ""}, {}, None),
    (ANTHROPIC, {"x-api-key": "tw_abc"}, {}, "tw_abc"),
    (ANTHROPIC, {"authorization": "Bearer tw_abc"}, {}, "tw_abc"),
    (ANTHROPIC, {"x-api-key": "tw_first", "authorization": "Bearer tw_second"}, {}, "tw_second"),  # Bearer wins
    (ANTHROPIC, {"x-goog-api-key": "tw_abc"}, {}, None),
    (ANTHROPIC, {}, {"key": "tw_abc"}, None),
    (GEMINI, {"x-goog-api-key": "tw_abc"}, {}, "tw_abc"),
    (GEMINI, {"authorization": "Bearer tw_abc"}, {}, "tw_abc"),
    (GEMINI, {}, {"key": "tw_abc", "alt": "sse"}, "tw_abc"),
    (GEMINI, {"x-goog-api-key": "tw_header"}, {"key": "tw_query"}, "tw_header"),
    (GEMINI, {"x-api-key": "tw_abc"}, {}, None),
    (GEMINI, {}, {"key": ""}, None),
    (AZURE, {"api-key": "tw_abc"}, {}, "tw_abc"),
    (AZURE, {"authorization": "Bearer tw_abc"}, {}, "tw_abc"),
])
def test_client_credential(adapter, headers, query, expected):
    assert adapter.client_credential(headers, query) == expected


def test_key_headers_per_adapter():
    from proxy.crypto import Secret

    key = Secret("sk-real-provider-key")
    assert OPENAI.key_headers(key) == [("authorization", "Bearer sk-real-provider-key")]
    assert ANTHROPIC.key_headers(key) == [("x-api-key", "sk-real-provider-key")]
    assert GEMINI.key_headers(key) == [("x-goog-api-key", "sk-real-provider-key")]
    assert AZURE.key_headers(key) == [("api-key", "sk-real-provider-key")]


# --- error bodies -------------------------------------------------------------------------------------------
ERRORS = [Unauthenticated("no credential"), PolicyDenied("tenant 'acme' may not use 'openai/o3'"),
          NoRoute("no route"), Forbidden("forbidden"), UnknownProvider("unknown provider"), BadRequest("bad json"),
          BodyTooLarge("too large"), RateLimited("slow down", retry_after=3), BudgetExceeded("budget"),
          StoreUnavailable("store"), UpstreamUnreachable("unreachable"), UpstreamTimeout("timeout"),
          TollwayError("generic")]


@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_openai_error_body(err):
    body = json.loads(OPENAI.error_body(err))
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] == err.message
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None


@pytest.mark.parametrize("err, type_, code", [
    (Unauthenticated("x"), "invalid_request_error", "invalid_tollway_credential"),
    (PolicyDenied("x"), "permission_error", "model_not_allowed"),
    (BadRequest("x"), "invalid_request_error", None),
    (RateLimited("x"), "rate_limit_error", "rate_limit_exceeded"),
    (BudgetExceeded("x"), "insufficient_quota", "insufficient_quota"),  # as OpenAI says it for billing limits
    (UpstreamTimeout("x"), "api_error", "upstream_timeout"),
    (UnknownProvider("x"), "invalid_request_error", "unknown_provider"),
])
def test_openai_error_types(err, type_, code):
    error = json.loads(OPENAI.error_body(err))["error"]
    assert (error["type"], error["code"]) == (type_, code)


@pytest.mark.parametrize("err, type_", [
    (Unauthenticated("x"), "authentication_error"), (PolicyDenied("x"), "permission_error"),
    (NoRoute("x"), "permission_error"), (UnknownProvider("x"), "not_found_error"),
    (BadRequest("x"), "invalid_request_error"), (BodyTooLarge("x"), "request_too_large"),
    (RateLimited("x"), "rate_limit_error"), (BudgetExceeded("x"), "rate_limit_error"),
    (UpstreamUnreachable("x"), "api_error"), (UpstreamTimeout("x"), "timeout_error"),
    (StoreUnavailable("x"), "overloaded_error"), (TollwayError("x"), "api_error"),
])
def test_anthropic_error_body(err, type_):
    body = json.loads(ANTHROPIC.error_body(err))
    assert body == {"type": "error", "error": {"type": type_, "message": "x"}}


@pytest.mark.parametrize("err, code, status", [
    (Unauthenticated("x"), 401, "UNAUTHENTICATED"), (PolicyDenied("x"), 403, "PERMISSION_DENIED"),
    (NoRoute("x"), 403, "PERMISSION_DENIED"), (UnknownProvider("x"), 404, "NOT_FOUND"),
    (BadRequest("x"), 400, "INVALID_ARGUMENT"), (BodyTooLarge("x"), 413, "INVALID_ARGUMENT"),
    (RateLimited("x"), 429, "RESOURCE_EXHAUSTED"), (BudgetExceeded("x"), 429, "RESOURCE_EXHAUSTED"),
    (UpstreamUnreachable("x"), 502, "UNAVAILABLE"), (UpstreamTimeout("x"), 504, "DEADLINE_EXCEEDED"),
    (StoreUnavailable("x"), 503, "UNAVAILABLE"),
])
def test_gemini_error_body(err, code, status):
    body = json.loads(GEMINI.error_body(err))
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "domain": "tollway",
                "reason": "INVALID_TOLLWAY_CREDENTIAL"}] if code == 401 else None
    assert body == {"error": {"code": code, "message": "x", "status": status} | ({"details": details} if details else {})}
    assert body["error"]["code"] == err.status


@pytest.mark.parametrize("adapter", [OPENAI, ANTHROPIC, GEMINI, AZURE], ids=["openai", "anthropic", "gemini", "azure"])
def test_error_body_escapes_the_message(adapter):
    message = 'quote " backslash \\ newline \n unicode ✓ <tag>'
    body = json.loads(adapter.error_body(BadRequest(message)))
    assert body["error"]["message"] == message


# --- usage from whole bodies -------------------------------------------------------------------------------
def test_usage_from_chat_completion_body():
    payload = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [],
               "usage": {"prompt_tokens": 1311, "completion_tokens": 214, "total_tokens": 1525,
                         "prompt_tokens_details": {"cached_tokens": 1152, "audio_tokens": 0},
                         "completion_tokens_details": {"reasoning_tokens": 192}}}
    assert core(OPENAI.usage_from_body(payload)) == Usage(input_tokens=1311, output_tokens=214, cached_input_tokens=1152,
                                                    reasoning_tokens=192)


def test_usage_from_chat_completion_body_without_details():
    payload = {"usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}}
    assert core(OPENAI.usage_from_body(payload)) == Usage(input_tokens=9, output_tokens=12)


def test_usage_from_responses_body():
    payload = {"object": "response", "usage": {"input_tokens": 2093, "input_tokens_details": {"cached_tokens": 1920},
                                               "output_tokens": 358, "output_tokens_details": {"reasoning_tokens": 320},
                                               "total_tokens": 2451}}
    assert core(OPENAI.usage_from_body(payload)) == Usage(input_tokens=2093, output_tokens=358, cached_input_tokens=1920,
                                                    reasoning_tokens=320)


def test_usage_from_embeddings_body():
    payload = {"object": "list", "data": [{"embedding": [0.1, 0.2]}], "model": "text-embedding-3-small",
               "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    usage = OPENAI.usage_from_body(payload)
    assert core(usage) == Usage(input_tokens=8, output_tokens=0)
    assert usage.reported


@pytest.mark.parametrize("payload", [{}, {"usage": None}, {"usage": "x"}, [], "text", None, 3])
def test_usage_from_body_without_usage_is_unknown_not_zero(payload):
    for adapter in (OPENAI, ANTHROPIC):
        usage = adapter.usage_from_body(payload)
        assert core(usage) == Usage()
        assert not usage.reported
    if not isinstance(payload, list):
        assert core(GEMINI.usage_from_body(payload)) == Usage()


@pytest.mark.parametrize("bad", [-1, True, "12", 1.5])
def test_usage_figures_that_are_not_counts_are_unknown(bad):
    usage = OPENAI.usage_from_body({"usage": {"prompt_tokens": bad, "completion_tokens": 5}})
    assert usage.input_tokens is None
    assert usage.output_tokens == 5


def test_usage_from_anthropic_message_body():
    payload = {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
               "usage": {"input_tokens": 27, "cache_creation_input_tokens": 1843, "cache_read_input_tokens": 6120,
                         "output_tokens": 31}}
    assert core(ANTHROPIC.usage_from_body(payload)) == Usage(input_tokens=7990, output_tokens=31, cached_input_tokens=6120,
                                                       cache_write_tokens=1843)


def test_usage_from_anthropic_message_body_without_cache():
    payload = {"usage": {"input_tokens": 12, "output_tokens": 7}}
    assert core(ANTHROPIC.usage_from_body(payload)) == Usage(input_tokens=12, output_tokens=7)
    payload = {"usage": {"input_tokens": 12, "cache_creation_input_tokens": None, "cache_read_input_tokens": 0,
                         "output_tokens": 7}}
    assert core(ANTHROPIC.usage_from_body(payload)) == Usage(input_tokens=12, output_tokens=7, cached_input_tokens=0)


def test_usage_from_gemini_response_body():
    payload = {"candidates": [], "usageMetadata": {"promptTokenCount": 4521, "candidatesTokenCount": 23,
                                                   "totalTokenCount": 4961, "cachedContentTokenCount": 4096,
                                                   "thoughtsTokenCount": 417}}
    assert core(GEMINI.usage_from_body(payload)) == Usage(input_tokens=4521, output_tokens=440, cached_input_tokens=4096,
                                                    reasoning_tokens=417)


def test_usage_from_gemini_response_body_without_thoughts():
    payload = {"usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 4, "totalTokenCount": 14}}
    assert core(GEMINI.usage_from_body(payload)) == Usage(input_tokens=10, output_tokens=4)


def test_usage_from_gemini_json_array_stream():
    payload = [
        {"candidates": [{"content": {"parts": [{"text": "Photo"}]}}],
         "usageMetadata": {"promptTokenCount": 4521, "cachedContentTokenCount": 4096, "thoughtsTokenCount": 417}},
        {"candidates": [{"content": {"parts": [{"text": "synthesis"}]}}]},
        {"candidates": [{"content": {"parts": [{"text": "."}]}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 4521, "candidatesTokenCount": 23, "totalTokenCount": 4961,
                           "cachedContentTokenCount": 4096, "thoughtsTokenCount": 417}},
    ]
    assert core(GEMINI.usage_from_body(payload)) == Usage(input_tokens=4521, output_tokens=440, cached_input_tokens=4096,
                                                    reasoning_tokens=417)


def test_usage_from_gemini_json_array_without_usage():
    assert core(GEMINI.usage_from_body([{"candidates": []}, "junk", 3])) == Usage()
    assert core(GEMINI.usage_from_body([])) == Usage()


def test_usage_merge_takes_only_known_figures():
    usage = Usage(input_tokens=10, output_tokens=1, cached_input_tokens=4)
    usage.merge(Usage(output_tokens=20))
    assert core(usage) == Usage(input_tokens=10, output_tokens=20, cached_input_tokens=4)
    assert not Usage().reported
    assert Usage(output_tokens=0).reported
