"""Property-based fuzzing of Tollway's parsers, price arithmetic and HTTP surface (hypothesis).

- SSE usage taps: any chunking, any line-ending style and interleaved garbage give the same usage.
- Policy files: arbitrary text never raises and every problem is a well-formed `file:line: severity: msg`;
  valid generated rows give no errors.
- Pricing: `cost_of` is exact Decimal arithmetic, monotone, additive; `cents` rounds half-up.
- HTTP: random requests against a real `tollway serve` never get a 500, and refusals come in the
  route's own error format.
"""

from __future__ import annotations

import json
import os
import re
import threading
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from analytics.billing import cents
from policy.files import LIMITS_HEADER, load_policy_files
from policy.loader import PolicyInvalid, check_policy_set, load_policy_set
from proxy.cli import main as cli_main
from proxy.metering import HEADER as PRICING_HEADER
from proxy.metering import Price, cost_of
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.base import CallInfo, Usage
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import OpenAIAdapter
from proxy.sse import SseParser
from tests.helpers import GatewayProcess
from tests.pricing_helpers import OverrideBook, load_pricebook

# The suite runs the same examples every time (a red CI is then a real, reproducible regression);
# `HYPOTHESIS_PROFILE=explore python3 -m pytest tests/test_fuzz.py` searches new ones.
settings.register_profile("suite", derandomize=True, database=None)
settings.register_profile("explore", max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "expected_usage.json").read_text())
FIXTURE_NAMES = sorted(EXPECTED)
ADAPTERS = {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter(), "gemini": GeminiAdapter()}
ENDPOINTS = {"chat.completions": "chat/completions", "responses": "responses", "messages": "messages",
             "streamGenerateContent": "streamGenerateContent"}


# =================================================================================================
# SSE usage taps
# =================================================================================================
def tap_usage(provider: str, api: str, chunks: list[bytes], hide: bool = False) -> tuple[Usage, int]:
    """Relay `chunks` the way the forwarder does (parser + the adapter's tap); usage and text chars."""
    adapter = ADAPTERS[provider]
    tap = adapter.stream_tap(CallInfo("m", True, ENDPOINTS[api], hide_usage_event=hide))
    parser = SseParser()
    for chunk in chunks:
        for event in parser.feed(chunk):
            tap.feed(event)
    for event in parser.close():
        tap.feed(event)
    return tap.usage, tap.text_chars


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({c for c in cuts if 0 <= c <= len(data)}), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def tricky_positions(data: bytes) -> list[int]:
    """Cut points inside a multi-byte UTF-8 character or between a CR and its LF."""
    inside_char = [i for i in range(1, len(data)) if 0x80 <= data[i] < 0xC0]
    inside_crlf = [i for i in range(1, len(data)) if data[i - 1] == 0x0D and data[i] == 0x0A]
    return inside_char + inside_crlf


@st.composite
def chunkings(draw, data: bytes) -> list[bytes]:
    """A hypothesis-chosen split of `data`: random cuts plus cuts at the tricky positions."""
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=40))
    tricky = tricky_positions(data)
    if tricky:
        cuts += draw(st.lists(st.sampled_from(tricky), max_size=15))
    return split_at(data, cuts)


def blocks_of(data: bytes) -> list[list[bytes]]:
    """The events of an LF/CRLF stream as lists of lines (the blank-line terminators dropped)."""
    lf = data.replace(b"\r\n", b"\n")
    return [block.split(b"\n") for block in lf.split(b"\n\n") if block.strip()]


def assemble(blocks: list[list[bytes]], newline: bytes = b"\n") -> bytes:
    return b"".join(newline.join(lines) + newline + newline for lines in blocks)


NEWLINES = st.sampled_from([b"\n", b"\r\n", b"\r"])

# --- garbage that must never change usage ---------------------------------------------------------
_line_text = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), max_size=30).map(
    lambda s: s.encode("utf-8"))
_field_name = st.text(st.characters(exclude_characters="\r\n:", codec="utf-8"), min_size=1, max_size=10).filter(
    lambda s: s.strip() not in ("data", "event") and s not in ("data", "event") and not s.startswith(":")).map(
    lambda s: s.encode("utf-8"))
#: A line that may sit inside any event: a comment, or a field SSE does not know.
garbage_line = st.one_of(
    _line_text.map(lambda t: b":" + t),
    st.sampled_from([b"id", b"retry", b"foo", b"Data", b"EVENT", b"dat", b"x-usage"]).flatmap(
        lambda name: _line_text.map(lambda t: name + b": " + t)),
    st.tuples(_field_name, _line_text).map(lambda p: p[0] + b":" + p[1]),
    _field_name.filter(lambda n: n not in (b"data", b"event")),  # a field with no colon at all
)
_not_json = st.sampled_from([b"{not json", b"{\"usage\": ", b"\xff\xfe\xfd", b"[1, 2", b"nul", b"{'a': 1}",
                             b"{\"usage\": {\"prompt_tokens\": 5}", b"\"unterminated", b"}{"])
_json_non_object = st.sampled_from([b"[1, 2, 3]", b"\"usage\"", b"null", b"12", b"true", b"[]",
                                    b"[{\"usage\": {\"prompt_tokens\": 9}}]"])
_unrelated_object = st.dictionaries(
    st.sampled_from(["foo", "bar", "index", "object", "meta"]),
    st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=3).map(lambda d: json.dumps(d).encode())
#: A whole event of garbage: data lines that are not JSON, not objects, or objects with nothing known.
garbage_event = st.one_of(
    st.lists(garbage_line, min_size=1, max_size=3),
    st.one_of(_not_json, _json_non_object, _unrelated_object, _line_text).map(lambda d: [b"data: " + d]),
    st.tuples(st.text("abcxyz-_.", min_size=1, max_size=8), _unrelated_object).map(
        lambda p: [b"event: x-" + p[0].encode(), b"data: " + p[1]]),
    st.just([b"data: [DONE]"]),
)


@st.composite
def with_garbage(draw, blocks: list[list[bytes]]) -> list[list[bytes]]:
    """`blocks` with garbage lines inserted inside events and garbage events between them."""
    out: list[list[bytes]] = []
    for lines in blocks:
        if draw(st.booleans()):
            out.append(draw(garbage_event))
        lines = list(lines)
        for _ in range(draw(st.integers(0, 2))):
            lines.insert(draw(st.integers(0, len(lines))), draw(garbage_line))
        out.append(lines)
    if draw(st.booleans()):
        out.append(draw(garbage_event))
    return out


def fixture_case(name: str) -> tuple[str, str, bytes]:
    meta = EXPECTED[name]
    return meta["provider"], meta["api"], (FIXTURES / name).read_bytes()


def test_reassembled_fixtures_keep_their_usage():
    """The harness itself: re-framing a recorded stream from its parsed lines changes nothing."""
    for name in FIXTURE_NAMES:
        provider, api, raw = fixture_case(name)
        whole, chars = tap_usage(provider, api, [raw])
        assert tap_usage(provider, api, [assemble(blocks_of(raw))]) == (whole, chars), name
        assert whole.reported is (EXPECTED[name]["usage"] is not None), name
        assert chars == len(EXPECTED[name]["text"]), name


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(FIXTURE_NAMES), hide=st.booleans(), data=st.data())
def test_fixture_usage_is_the_same_under_any_split(name, hide, data):
    provider, api, raw = fixture_case(name)
    whole = tap_usage(provider, api, [raw], hide)
    chunks = data.draw(chunkings(raw))
    assert b"".join(chunks) == raw
    assert tap_usage(provider, api, chunks, hide) == whole


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(FIXTURE_NAMES), newline=NEWLINES, data=st.data())
def test_fixture_usage_is_the_same_whatever_the_line_endings(name, newline, data):
    provider, api, raw = fixture_case(name)
    whole = tap_usage(provider, api, [raw])
    restyled = assemble(blocks_of(raw), newline)
    assert tap_usage(provider, api, [restyled]) == whole
    assert tap_usage(provider, api, data.draw(chunkings(restyled))) == whole


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(FIXTURE_NAMES), newline=NEWLINES, data=st.data())
def test_fixture_usage_survives_interleaved_garbage(name, newline, data):
    provider, api, raw = fixture_case(name)
    whole_usage, _ = tap_usage(provider, api, [raw])
    noisy = assemble(data.draw(with_garbage(blocks_of(raw))), newline)
    usage, _ = tap_usage(provider, api, data.draw(chunkings(noisy)))
    assert usage == whole_usage


# --- generated streams with random usage numbers --------------------------------------------------
def _data(payload: dict, event: str | None = None) -> list[bytes]:
    line = b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8")
    return [b"event: " + event.encode(), line] if event else [line]


_count = st.integers(0, 2_000_000)
#: Reply text with multi-byte characters, so split points fall inside UTF-8 sequences.
_reply = st.lists(st.text(st.sampled_from("ab €é😀中\u2028\"\\\n"), min_size=1, max_size=8), min_size=1, max_size=6)


@st.composite
def generated_stream(draw) -> tuple[str, str, list[list[bytes]], Usage]:
    """(provider, api, event blocks, the canonical usage the stream reports, computed by hand)."""
    kind = draw(st.sampled_from(["openai-chat", "openai-responses", "anthropic", "gemini"]))
    texts = draw(_reply)
    if kind == "openai-chat":
        prompt, completion = draw(_count), draw(_count)
        cached, reasoning = draw(st.integers(0, prompt)), draw(st.integers(0, completion))
        blocks = [_data({"id": "c1", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]})
                  for t in texts]
        blocks.append(_data({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            "completion_tokens_details": {"reasoning_tokens": reasoning}}}))
        blocks.append([b"data: [DONE]"])
        return "openai", "chat.completions", blocks, Usage(prompt, completion, cached, None, reasoning)
    if kind == "openai-responses":
        inp, out = draw(_count), draw(_count)
        cached, reasoning = draw(st.integers(0, inp)), draw(st.integers(0, out))
        blocks = [_data({"type": "response.created", "response": {"usage": None}}, "response.created")]
        blocks += [_data({"type": "response.output_text.delta", "delta": t}, "response.output_text.delta")
                   for t in texts]
        blocks.append(_data({"type": "response.completed", "response": {"status": "completed", "usage": {
            "input_tokens": inp, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": inp + out}}},
            "response.completed"))
        return "openai", "responses", blocks, Usage(inp, out, cached, None, reasoning)
    if kind == "anthropic":
        uncached, read, write, out = draw(_count), draw(_count), draw(_count), draw(_count)
        blocks = [_data({"type": "message_start", "message": {"id": "m", "usage": {
            "input_tokens": uncached, "cache_read_input_tokens": read, "cache_creation_input_tokens": write,
            "output_tokens": 1}}}, "message_start"),
            _data({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                  "content_block_start")]
        blocks += [_data({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
                         "content_block_delta") for t in texts]
        blocks += [_data({"type": "ping"}, "ping"),
                   _data({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                          "usage": {"output_tokens": out}}, "message_delta"),
                   _data({"type": "message_stop"}, "message_stop")]
        return "anthropic", "messages", blocks, Usage(uncached + read + write, out, read, write, None)
    prompt, candidates, thoughts = draw(_count), draw(_count), draw(_count)
    cached, tool = draw(st.integers(0, prompt)), draw(st.integers(0, 1000))
    blocks = []
    for i, t in enumerate(texts):
        meta = {"promptTokenCount": prompt, "cachedContentTokenCount": cached, "toolUsePromptTokenCount": tool,
                "thoughtsTokenCount": thoughts}
        if i == len(texts) - 1:
            meta["candidatesTokenCount"] = candidates
        blocks.append(_data({"candidates": [{"content": {"parts": [{"text": t}], "role": "model"}, "index": 0}],
                             "usageMetadata": meta}))
    return "gemini", "streamGenerateContent", blocks, Usage(prompt + tool, candidates + thoughts, cached, None,
                                                            thoughts)


@settings(max_examples=150, deadline=None)
@given(case=generated_stream(), newline=NEWLINES, data=st.data())
def test_generated_stream_usage_under_any_split_and_line_ending(case, newline, data):
    provider, api, blocks, expected = case
    stream = assemble(blocks, newline)
    whole, chars = tap_usage(provider, api, [stream])
    assert whole == expected
    chunks = data.draw(chunkings(stream))
    assert b"".join(chunks) == stream
    assert tap_usage(provider, api, chunks) == (whole, chars)
    assert tap_usage(provider, api, [assemble(blocks, b"\n")]) == (whole, chars)


@settings(max_examples=150, deadline=None)
@given(case=generated_stream(), newline=NEWLINES, data=st.data())
def test_generated_stream_usage_survives_interleaved_garbage(case, newline, data):
    provider, api, blocks, expected = case
    noisy = assemble(data.draw(with_garbage(blocks)), newline)
    usage, _ = tap_usage(provider, api, data.draw(chunkings(noisy)))
    assert usage == expected


def test_garbage_property_can_fail():
    """A data line that *is* a usage object is not garbage: it must change the result, or the
    garbage properties above would prove nothing."""
    provider, api, raw = fixture_case("openai_chat_stream.sse")
    blocks = blocks_of(raw)
    spoiled = assemble([*blocks, [b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}']])
    assert tap_usage(provider, api, [spoiled])[0] != tap_usage(provider, api, [raw])[0]





def _event_id(value) -> str | None:
    return re.sub(rb"[^A-Za-z0-9_.:]+", b"-", value).decode()[:60].strip("-") if isinstance(value, bytes) else None


#: Well-formed JSON events whose known fields have an unexpected type: the taps must shrug them off
#: (as they do for invalid JSON and non-object payloads) instead of raising in the middle of a relayed stream.
@pytest.mark.parametrize("provider, api, event", [
    pytest.param("anthropic", "messages", b'event: content_block_delta\ndata: {"type": "content_block_delta", '
                 b'"delta": "x"}\n\n'),
    pytest.param("anthropic", "messages", b'data: {"type": "content_block_delta", "delta": {"text": 5}}\n\n'),
    pytest.param("gemini", "streamGenerateContent", b'data: {"candidates": ["x"]}\n\n'),
    pytest.param("gemini", "streamGenerateContent", b'data: {"candidates": 5}\n\n'),
    pytest.param("gemini", "streamGenerateContent",
                 b'data: {"candidates": [{"content": {"parts": [{"text": 5}]}}]}\n\n'),
    pytest.param("openai", "chat.completions", b'data: {"choices": 5}\n\n'),
    pytest.param("openai", "responses", b'data: {"type": "response.output_text.delta", "delta": 5}\n\n'),
    ("openai", "chat.completions", b'data: {"choices": ["x"], "usage": "x"}\n\n'),  # these are already tolerated
    ("anthropic", "messages", b'data: {"type": "message_start", "message": "x"}\n\n'),
    ("gemini", "streamGenerateContent", b'data: {"usageMetadata": "x"}\n\n'),
], ids=_event_id)
def test_wrongly_typed_fields_in_stream_events_do_not_crash_the_tap(provider, api, event):
    _, _, raw = fixture_case(next(n for n in FIXTURE_NAMES if EXPECTED[n]["provider"] == provider
                                  and EXPECTED[n]["api"] == api and EXPECTED[n]["usage"]))
    blocks = blocks_of(raw)
    spoiled = assemble(blocks[:1]) + event + assemble(blocks[1:])
    assert tap_usage(provider, api, [spoiled])[0] == tap_usage(provider, api, [raw])[0]


# --- the SSE parser's event cap ------------------------------------------------------------------
_SSE_BITS = st.sampled_from([b"data: ", b"data:", b"event: ", b": ping", b"\n", b"\r\n", b"\r", b"\n\n",
                             b"\r\n\r\n", b"\r\r", b"{\"a\": 1}", b"[DONE]", b" ", b"\xff"])
#: SSE-like bytes with long stretches that have no boundary, so that caps of 8 to 64 bytes are crossed.
capped_streams = st.lists(st.one_of(_SSE_BITS, st.binary(max_size=24), st.integers(0, 160).map(lambda n: b"x" * n)),
                          max_size=30).map(b"".join)


def spans(events: list) -> dict[tuple[int, int], object]:
    """Each event by the stretch of the stream its raw bytes cover (events' raws are consecutive)."""
    out, at = {}, 0
    for e in events:
        out[(at, at + len(e.raw))] = e
        at += len(e.raw)
    return out


@settings(max_examples=300, deadline=None)
@given(data=capped_streams, cap=st.integers(8, 64), split=st.data())
@example(data=b"data: " + b"x" * 100 + b"\r\n\r\ndata: y\n\n", cap=8, split=None)
def test_capped_sse_parser_hands_back_every_byte_once_in_order(data, cap, split):
    """For any stream, split and small cap: the raws of the events returned, then what is pending, are
    the input exactly (no byte lost, doubled or reordered); close() hands the pending bytes back, unless
    they are only the whitespace after the last event. Unread pieces are never interpreted and break only
    where the stream has an event boundary; every other event is the one the uncapped parser reads; and an
    event is handed back unread exactly when, at the end of some chunk, more than `cap` bytes of it had
    arrived without its end."""
    chunks = split.draw(chunkings(data)) if split is not None else [data[:20], data[20:]]
    parser, returned = SseParser(cap), []
    for chunk in chunks:
        returned += parser.feed(chunk)
        assert len(parser.pending()) <= cap + len(chunk)
    pending = parser.pending()
    assert b"".join(e.raw for e in returned) + pending == data
    tail = parser.close()
    assert [e.raw for e in tail] == ([pending] if tail else []) and (tail or not pending.strip())
    returned += tail
    assert all(e.event is None and e.data == b"" for e in returned if e.unread)
    whole = SseParser(max_event_bytes=len(data) + 1)  # never reaches its cap: the reference
    framed = whole.feed(data)
    reference = spans(framed + whole.close())
    assert not any(e.unread for e in reference.values())
    capped = spans(returned)
    for where, event in capped.items():
        if not event.unread:
            assert reference[where] == event, (where, event)
    assert {end for _, end in reference} <= {end for _, end in capped}  # pieces end at every real boundary
    ends = [sum(map(len, chunks[:i + 1])) for i in range(len(chunks))]
    for index, ((start, end), event) in enumerate(reference.items()):
        unfinished = [c for c in ends if start < c and (c < end or index >= len(framed))]  # close()'s has no end
        if any(c - start > cap for c in unfinished):
            assert all(e.unread for (s, t), e in capped.items() if start <= s < end), (start, end)
        else:
            assert capped.get((start, end)) == event, (start, end, event)


_WHOLE_EVENTS = st.lists(st.one_of(st.binary(max_size=40).map(lambda b: b"data: " + b + b"\n\n"), _SSE_BITS),
                         max_size=20)


@settings(max_examples=300, deadline=None)
@given(parts=_WHOLE_EVENTS, split=st.data())
@example(parts=[b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"], split=None)
def test_chunks_of_whole_events_read_as_the_same_bytes_fed_one_at_a_time(parts, split):
    """The parser's shortcut for a chunk of whole `\\n\\n`-framed events (and for a one-line `data: ` event)
    reads exactly what the boundary search reads; a one-byte chunk never takes the shortcut."""
    data = b"".join(parts)
    if split is None:
        chunks = parts
    else:  # cuts at event boundaries (the shortcut's case) and anywhere else
        bounds = [sum(map(len, parts[:i])) for i in range(len(parts) + 1)]
        chunks = split_at(data, split.draw(st.lists(st.sampled_from(bounds) | st.integers(0, len(data)), max_size=30)))

    def events(pieces: list[bytes]) -> list:
        parser = SseParser()
        return [e for piece in pieces for e in parser.feed(piece)] + parser.close()

    assert events(chunks) == events([data[i:i + 1] for i in range(len(data))])


@settings(max_examples=200, deadline=None)
@given(data=capped_streams, extra=st.integers(0, 64), split=st.data())
def test_a_cap_larger_than_the_stream_changes_nothing(data, extra, split):
    chunks = split.draw(chunkings(data))

    def events(parser: SseParser) -> list:
        return [e for chunk in chunks for e in parser.feed(chunk)] + parser.close()

    assert events(SseParser(max_event_bytes=len(data) + extra)) == events(SseParser())


# =================================================================================================
# Policy files
# =================================================================================================

POLICY_TARGETS = ("policy/access.csv", "policy/routes.csv", "policy/limits.csv", "tenants.csv")
CHECKED_FILES = (*POLICY_TARGETS, "pricing.csv")
PROBLEM_FORMAT = re.compile(r"(?P<file>[^:\n]+):(?P<line>\d+): (?:error|warning): [^\n]+")
TENANTS_HEADER = "tenant,name,markup_pct,byok_fee_pct"


def line_count(raw: bytes) -> int:
    """Lines as Python's universal newlines see them (LF, CRLF or a lone CR ends one)."""
    ends = len(re.findall(rb"\r\n|\r|\n", raw))
    return ends + (1 if raw and not raw.endswith((b"\n", b"\r")) else 0)


@pytest.fixture
def policy_dir(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """One deployment made by `tollway init` per test function, and its pristine policy files."""
    path = tmp_path / "deploy"
    assert cli_main(["init", str(path)]) == 0
    return path, {name: (path / name).read_bytes() for name in CHECKED_FILES}


def reset(path: Path, pristine: dict[str, bytes]) -> None:
    for name, raw in pristine.items():
        (path / name).write_bytes(raw)


def assert_problems_well_formed(path: Path, problems) -> None:
    counts = {name: line_count((path / name).read_bytes()) for name in CHECKED_FILES}
    for problem in problems:
        text = str(problem)
        match = PROBLEM_FORMAT.fullmatch(text)
        assert match, f"malformed problem: {text!r}"
        assert match["file"] in counts, text
        assert 0 <= int(match["line"]) <= counts[match["file"]], f"{text!r}: the file has {counts[match['file']]} lines"


_CSV_PIECES = st.sampled_from([
    "p", "g", ",", ", ", '"', '""', "'", "#", " ", "\t", "\x00", "\ufeff", "\u2028", "\x0c", "\x85", "\n", "\r",
    "\r\n", "acme", "globex", "*", "role:", "role:engineering", "alice@acme.com", "openai/*", "anthropic/claude-*",
    "gpt-4o", "?", "/", "|", "allow", "deny", "tenant", "usd", "tokens", "requests", "minute", "month", "1", "0",
    "-1", "2.5", "1e999", "1e-999", "NaN", "sNaN", "Infinity", "١٢", "operator-openai", "x" * 3000, "é", "😀",
    "\\", ";", ":", "..", "%2f",
])
_FIELD = st.one_of(
    st.sampled_from(["acme", "globex", "*", "role:engineering", "role:", "role:a b", "alice@acme.com", "openai/*",
                     "anthropic/claude-*", "gpt-4o", "*mini", "?", "openai/gpt-?o", "tenant", "usd", "tokens",
                     "requests", "minute", "hour", "month", "week", "allow", "deny", "Allow", "1", "0", "-1", "2.5",
                     "1e999", "1e-999", "NaN", "sNaN", "Infinity", "١٢", "operator-openai", "a|b", "a||b", "|", "",
                     "2025-01-01", "2025-02-30", "x" * 500, " ", "#x", '"', "\x00", "\ufeffp"]),
    st.text(max_size=6))


def _pos(*valid: str):
    """A field that is one of `valid` most of the time, anything else otherwise."""
    good = st.sampled_from(valid)
    return st.one_of(good, good, good, _FIELD)


def _quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"' if any(c in field for c in ',"\r\n') else field


_SUBJ, _TEN = _pos("*", "role:engineering", "alice@acme.com", "bob"), _pos("acme", "globex", "*")
_GLOBP = _pos("openai/*", "anthropic/claude-*", "*", "gemini/gemini-2.5-?lash", "openai/gpt-4o-mini")
#: Per file, lines with the right number of fields, each field valid or not: they reach every check.
FILE_ROWS = {
    "policy/access.csv": st.one_of(
        st.tuples(st.just("p"), _SUBJ, _TEN, _GLOBP, _pos("allow", "deny")),
        st.tuples(st.just("g"), _pos("alice@acme.com", "x.y", "*"), _pos("role:engineering", "role:a"), _TEN)),
    "policy/routes.csv": st.tuples(_pos("p"), _TEN, _GLOBP, _pos("operator-openai", "k1|k2", "a.b", "a| b")),
    "policy/limits.csv": st.tuples(_TEN, _pos("tenant", "*", "role:x", "carol"), _pos("usd", "tokens", "requests"),
                                   _pos("minute", "hour", "day", "month"), _pos("0", "12", "2.5", "100000", "-3")),
    "tenants.csv": st.tuples(_pos("acme", "globex", "initech", "*"), _FIELD, _pos("0", "12.5", "-1"),
                             _pos("0", "2.5", "NaN")),
    "pricing.csv": st.tuples(_pos("openai", "gemini"), _pos("gpt-4o", "x"), _pos("2025-01-01", "2024-02-29"),
                             *[_pos("1.25", "0", "", "-1")] * 4),
}
HEADERS = {"tenants.csv": TENANTS_HEADER, "policy/limits.csv": ",".join(LIMITS_HEADER),
           "pricing.csv": "provider,model,effective_from,input_usd_per_mtok,output_usd_per_mtok,"
                          "cached_input_usd_per_mtok,cache_write_usd_per_mtok"}


def rows_text(rows):
    """Rows (some cut short or made longer) as CSV lines, with comments and blank lines between."""
    line = st.tuples(rows, st.sampled_from([0, 0, 0, 0, 0, -1, 1]), _FIELD).map(
        lambda t: list(t[0])[:len(t[0]) + t[1]] + ([t[2]] if t[1] > 0 else []))
    return st.lists(st.one_of(line.map(lambda f: ", ".join(map(_quote, f))), st.sampled_from(["", "# c", "  "])),
                    max_size=12)


_CSV_PIECES = st.sampled_from([
    "p", "g", ",", ", ", '"', '""', "'", "#", " ", "\t", "\x00", "\ufeff", "\u2028", "\x0c", "\x85", "\n", "\r",
    "\r\n", "acme", "globex", "*", "role:", "alice@acme.com", "openai/*", "?", "/", "|", "allow", "deny", "tenant",
    "usd", "1", "-1", "1e999", "NaN", "١٢", "x" * 3000, "é", "😀", "\\", ";", ":", "..", "%2f",
])
#: Text that does not look like the files at all.
junk_text = st.one_of(
    st.lists(st.one_of(_CSV_PIECES, st.text(max_size=8)), max_size=60).map("".join),
    st.text(max_size=300),
    st.text(st.characters(codec="utf-8"), min_size=2000, max_size=6000),
)


@st.composite
def arbitrary_file(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(CHECKED_FILES))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    if draw(st.integers(0, 3)):
        lines = draw(rows_text(FILE_ROWS[name]))
        if name in HEADERS and draw(st.integers(0, 5)):
            lines.insert(0, HEADERS[name])
        text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    else:
        text = draw(junk_text)
        if name in HEADERS and draw(st.booleans()):
            text = HEADERS[name] + newline + text
    if draw(st.integers(0, 9)) == 0:
        text = "\ufeff" + text
    raw = text.encode("utf-8")
    if name != "pricing.csv" and draw(st.integers(0, 9)) == 0:  # not UTF-8 (pricing.csv is checked apart below)
        raw = draw(st.binary(max_size=200)) + b"\xff\xfe" + raw
    return name, raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=arbitrary_file())
@example(case=("policy/access.csv", b'p, "unterminated\n'))
@example(case=("tenants.csv", b"\ufefftenant,name,markup_pct,byok_fee_pct\r\nacme,\x00,1e999,sNaN\r"))
@example(case=("policy/limits.csv", b"tenant,subject,metric,window,limit\nacme,*,tokens,minute,1e999999\n"))
@example(case=("policy/routes.csv", b"p, *, openai/*, " + b"k" * 140_000 + b"\n"))  # beyond csv's field limit
@example(case=("tenants.csv", b"\xff\xfe\x00t\x00e\x00n\x00a\x00n\x00t\x00"))  # UTF-16, as some editors save
def test_arbitrary_policy_text_never_raises_and_problems_are_well_formed(policy_dir, case):
    path, pristine = policy_dir
    reset(path, pristine)
    name, raw = case
    (path / name).write_bytes(raw)
    files = load_policy_files(path)
    assert_problems_well_formed(path, files.problems)
    _, _, problems = check_policy_set(path, None)
    assert_problems_well_formed(path, problems)
    assert set(files.problems) <= set(problems)
    errors = [p for p in problems if p.severity == "error"]
    try:
        load_policy_set(path, None)
    except PolicyInvalid as exc:
        assert exc.problems == errors and errors
    else:
        assert errors == []


# --- valid rows --------------------------------------------------------------------------------------
_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._@\-]{0,11}", fullmatch=True)
_role = _name.map(lambda n: "role:" + n)
_glob = st.one_of(
    st.just("*"),
    st.tuples(st.sampled_from(["openai", "anthropic", "gemini", "groq"]),
              st.from_regex(r"[A-Za-z0-9._@:/\-*?]{0,12}", fullmatch=True)).map("/".join),
    st.from_regex(r"[A-Za-z0-9._@:/\-?]{0,8}\*", fullmatch=True),
)
_sep = st.sampled_from([",", ", ", " ,", " , ", ",\t", ",   "])
_amount_int = st.integers(0, 10**12).flatmap(lambda n: st.sampled_from([str(n), f"{n}.0", f" {n} "]))
_amount_usd = st.decimals(0, 10**9, places=4).map(str)


def _join(fields: list[str], sep: str) -> str:
    """Fields joined as a spreadsheet would read them: a quote opens a quoted field only at the field's
    start, and the loader tolerates spaces before it, not tabs (a tab there makes the quote literal)."""
    quoted = [_quote(f) for f in fields]
    out = quoted[0]
    for field in quoted[1:]:
        out += (sep.replace("\t", " ") if field.startswith('"') else sep) + field
    return out


@st.composite
def valid_policy_set(draw) -> tuple[dict[str, str], dict[str, list[tuple]]]:
    """Files that must load without a single error, and the rules each must yield (with line numbers)."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    sep = draw(_sep)
    tenants = draw(st.lists(_name, min_size=1, max_size=4, unique=True))
    users = draw(st.lists(_name, min_size=1, max_size=4, unique=True))
    roles = draw(st.lists(_role, min_size=1, max_size=3, unique=True))
    tenant_or_any = st.sampled_from([*tenants, "*"])
    expected: dict[str, list[tuple]] = {"access": [], "roles": [], "routes": [], "limits": [], "tenants": []}

    def render(rows: list[list[str] | None], header: str | None = None) -> tuple[str, list[int]]:
        """Rows (None: a comment or a blank line) as text; the line number of each real row."""
        lines, numbers = ([header] if header else []), []
        for row in rows:
            if row is None:
                lines.append(draw(st.sampled_from(["", "# a comment, with commas", "   ", "\t# indented"])))
            else:
                lines.append(_join(row, sep) + draw(st.sampled_from(["", " ", "\t"])))
                numbers.append(len(lines))
        return newline.join(lines) + newline, numbers

    def interleave(rows: list[list[str]]) -> list[list[str] | None]:
        out: list[list[str] | None] = []
        for row in rows:
            out += [None] * draw(st.integers(0, 1)) + [row]
        return out

    tenant_rows = [[t, draw(st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                                    max_size=12)).strip() or "Name",
                    str(draw(st.decimals(0, 100, places=2))), str(draw(st.decimals(0, 100, places=2)))]
                   for t in tenants]
    tenants_text, numbers = render(interleave(tenant_rows), TENANTS_HEADER)
    expected["tenants"] = [(n, r[0]) for n, r in zip(numbers, tenant_rows, strict=True)]

    access_rows = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            access_rows.append(["p", draw(st.sampled_from([*users, *roles, "*"])), draw(tenant_or_any),
                                draw(_glob), draw(st.sampled_from(["allow", "deny"]))])
        else:
            access_rows.append(["g", draw(st.sampled_from(users)), draw(st.sampled_from(roles)), draw(tenant_or_any)])
    access_text, numbers = render(interleave(access_rows))
    for n, row in zip(numbers, access_rows, strict=True):
        expected["access" if row[0] == "p" else "roles"].append((n, *row[1:]))

    route_rows = [["p", draw(tenant_or_any), draw(_glob),
                   draw(st.sampled_from(["|", " | "])).join(draw(st.lists(_name, min_size=1, max_size=3)))]
                  for _ in range(draw(st.integers(0, 6)))]
    routes_text, numbers = render(interleave(route_rows))
    expected["routes"] = [(n, r[1], r[2], tuple(k.strip() for k in r[3].split("|")))
                          for n, r in zip(numbers, route_rows, strict=True)]

    limit_rows = []
    for _ in range(draw(st.integers(0, 6))):
        metric = draw(st.sampled_from(["requests", "tokens", "usd"]))
        limit_rows.append([draw(tenant_or_any), draw(st.sampled_from(["tenant", "*", *roles, *users])), metric,
                           draw(st.sampled_from(["minute", "hour", "day", "month"])),
                           draw(_amount_usd if metric == "usd" else _amount_int)])
    limits_text, numbers = render(interleave(limit_rows), ",".join(LIMITS_HEADER))
    expected["limits"] = [(n, *r[:4], Decimal(r[4].strip())) for n, r in zip(numbers, limit_rows, strict=True)]

    texts = {"tenants.csv": tenants_text, "policy/access.csv": access_text, "policy/routes.csv": routes_text,
             "policy/limits.csv": limits_text}
    return texts, expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=valid_policy_set())
def test_valid_generated_rows_load_without_errors(policy_dir, case):
    path, pristine = policy_dir
    reset(path, pristine)
    texts, expected = case
    for name, text in texts.items():
        (path / name).write_bytes(text.encode("utf-8"))
    files, _, problems = check_policy_set(path, None)
    assert [str(p) for p in problems if p.severity == "error"] == []
    assert_problems_well_formed(path, problems)
    assert [(r.line, r.subject, r.tenant, r.model_glob, r.effect) for r in files.access] == expected["access"]
    assert [(r.line, r.user, r.role, r.tenant) for r in files.roles] == expected["roles"]
    assert [(r.line, r.tenant, r.model_glob, r.key_ids) for r in files.routes] == expected["routes"]
    assert [(r.line, r.tenant, r.subject, r.metric, r.window, r.limit) for r in files.limits] == expected["limits"]
    assert sorted(files.tenants) == sorted(t for _, t in expected["tenants"])
    load_policy_set(path, None)  # and the enforcers build from them


def test_non_utf8_pricing_csv_is_a_problem_not_a_crash(policy_dir):
    path, _ = policy_dir
    (path / "pricing.csv").write_bytes(b"provider,model\n\xff\xfe\n")
    _, _, problems = check_policy_set(path, None)
    assert [(p.file, p.line, p.severity) for p in problems if p.file == "pricing.csv"] == [("pricing.csv", 0, "error")]


def test_overlong_pricing_csv_field_is_a_problem_not_a_crash(policy_dir):
    path, _ = policy_dir
    (path / "pricing.csv").write_bytes(b"x" * 140_000 + b"\n")
    _, _, problems = check_policy_set(path, None)
    assert any(p.file == "pricing.csv" and p.severity == "error" for p in problems)


# =================================================================================================
# Pricing arithmetic
# =================================================================================================


_tokens = st.integers(0, 10**9)


def _price_value(places: int = 6):
    return st.decimals(0, 10_000, places=places, allow_nan=False, allow_infinity=False)


@st.composite
def prices(draw, places: int = 6) -> Price:
    optional = st.one_of(st.none(), _price_value(places))
    return Price(date(2025, 1, 1), draw(_price_value(places)), draw(_price_value(places)), draw(optional),
                 draw(optional))


@st.composite
def usages(draw) -> tuple[Usage, tuple[int, int, int, int]]:
    """A consistent usage (input = fresh + cached + written) and its four parts."""
    fresh, cached, written, output = draw(_tokens), draw(_tokens), draw(_tokens), draw(_tokens)
    usage = Usage(input_tokens=fresh + cached + written, output_tokens=output,
                  cached_input_tokens=draw(st.sampled_from([cached, None])) if cached == 0 else cached,
                  cache_write_tokens=draw(st.sampled_from([written, None])) if written == 0 else written)
    return usage, (fresh, cached, written, output)


def by_hand(price: Price, parts: tuple[int, int, int, int]) -> Decimal:
    fresh, cached, written, output = parts
    with localcontext() as ctx:
        ctx.prec = 200  # exact, whatever the default context would round
        cached_price = price.input if price.cached_input is None else price.cached_input
        write_price = price.input if price.cache_write is None else price.cache_write
        total = (Decimal(fresh) * price.input + Decimal(cached) * cached_price + Decimal(written) * write_price
                 + Decimal(output) * price.output)
        return (total / Decimal(10**6)).quantize(Decimal("1e-9"), rounding=ROUND_HALF_UP)


def plus(a: Usage, b: Usage, k: int = 1) -> Usage:
    return Usage(*[(getattr(a, f) or 0) + k * (getattr(b, f) or 0) for f in
                   ("input_tokens", "output_tokens", "cached_input_tokens", "cache_write_tokens", "reasoning_tokens")])


@settings(max_examples=300, deadline=None)
@given(price=prices(), case=usages())
@example(price=Price(date(2025, 1, 1), Decimal("2.50"), Decimal("10"), Decimal("1.25"), None),
         case=(Usage(1000, 100, 400), (600, 400, 0, 100)))
@example(price=Price(date(2025, 1, 1), Decimal("0.000001"), Decimal("0"), None, None),  # 0.5 nano-dollar: rounds up
         case=(Usage(500, 0), (500, 0, 0, 0)))
def test_cost_is_the_exact_decimal_hand_computation(price, case):
    usage, parts = case
    cost = cost_of(price, usage)
    assert type(cost) is Decimal
    assert cost == by_hand(price, parts)
    assert cost.as_tuple().exponent == -9  # quantized to the nano-dollar, like DECIMAL(18,9)
    assert cost >= 0


def test_cost_rounds_half_up_at_the_nano_dollar():
    half_nano = Price(date(2025, 1, 1), Decimal("0.0005"), Decimal("0.0015"), None, None)
    assert cost_of(half_nano, Usage(input_tokens=1, output_tokens=0)) == Decimal("0.000000001")  # 0.5e-9 -> 1e-9
    assert cost_of(half_nano, Usage(input_tokens=0, output_tokens=1)) == Decimal("0.000000002")  # 1.5e-9 -> 2e-9
    assert cost_of(Price(date(2025, 1, 1), Decimal("0.000499"), Decimal(0), None, None),
                   Usage(input_tokens=1, output_tokens=0)) == Decimal("0E-9")


@settings(max_examples=200, deadline=None)
@given(price=prices(places=3), a=usages(), b=usages(), k=st.integers(0, 50))
def test_cost_is_additive_when_rounding_cannot_interfere(price, a, b, k):
    """With at most 3 decimals in a price, token × price / 10^6 has at most 9 decimals: no rounding at all."""
    (ua, _), (ub, _) = a, b
    assert cost_of(price, plus(ua, ub)) == cost_of(price, ua) + cost_of(price, ub)
    assert cost_of(price, plus(Usage(), ua, k)) == k * cost_of(price, ua)


@settings(max_examples=200, deadline=None)
@given(price=prices(), case=usages(), which=st.integers(0, 4), delta=st.integers(1, 10**6))
def test_cost_is_monotone_in_each_token_count(price, case, which, delta):
    _, parts = case
    more = list(parts)
    if which < 4:  # one more fresh, cached, written or output token (the prompt grows with cached/written)
        more[which] += delta
        before, after = by_hand(price, parts), cost_of(price, _usage_of(more))
        assert cost_of(price, _usage_of(list(parts))) == before <= after
    else:  # input_tokens alone grows (the cached and written parts stay): never cheaper
        usage = _usage_of(list(parts))
        bigger = Usage(usage.input_tokens + delta, usage.output_tokens, usage.cached_input_tokens,
                       usage.cache_write_tokens)
        assert cost_of(price, bigger) >= cost_of(price, usage)


def _usage_of(parts: list[int]) -> Usage:
    fresh, cached, written, output = parts
    return Usage(input_tokens=fresh + cached + written, output_tokens=output, cached_input_tokens=cached,
                 cache_write_tokens=written)


@settings(max_examples=100, deadline=None)
@given(price=prices(), cached=_tokens, written=_tokens, input_tokens=_tokens)
def test_cached_and_written_beyond_the_input_never_cost_less_than_zero(price, cached, written, input_tokens):
    cost = cost_of(price, Usage(input_tokens=input_tokens, output_tokens=0, cached_input_tokens=cached,
                                cache_write_tokens=written))
    assert cost >= 0
    assert cost == by_hand(price, (max(input_tokens - cached - written, 0), cached, written, 0))


@settings(max_examples=100, deadline=None)
@given(price=prices(), empty=st.sampled_from([Usage(0, 0), Usage(0, 0, 0, 0, 0), Usage(input_tokens=0),
                                              Usage(output_tokens=0)]))
def test_zero_tokens_cost_zero(price, empty):
    cost = cost_of(price, empty)
    assert type(cost) is Decimal and cost == 0
    book = OverrideBook.of({("openai", "m"): [price]})
    assert book.cost("openai", "m", datetime(2025, 6, 1, tzinfo=UTC), empty) == 0


def test_cost_of_a_huge_token_count_is_still_a_decimal():
    price = Price(date(2025, 1, 1), Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), None)
    assert cost_of(price, Usage(input_tokens=0, output_tokens=10**27)) == by_hand(price, (0, 0, 0, 10**27))


_money = st.decimals(-10**6, 10**6, places=9, allow_nan=False, allow_infinity=False)


@st.composite
def pricing_csv(draw) -> tuple[str, list[tuple[str, str, date, list[str]]]]:
    """A valid pricing.csv: models with one or more dated prices written as text."""
    rows = []
    models = draw(st.lists(st.tuples(st.sampled_from(["openai", "anthropic", "gemini"]),
                                     st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,10}", fullmatch=True)),
                           min_size=1, max_size=4, unique=True))
    for provider, model in models:
        days = draw(st.lists(st.dates(date(2023, 1, 1), date(2026, 12, 31)), min_size=1, max_size=3, unique=True))
        for day in days:
            amounts = [str(draw(_price_value())) for _ in range(2)]
            amounts += [draw(st.one_of(st.just(""), _price_value().map(str))) for _ in range(2)]
            rows.append((provider, model, day, amounts))
    lines = [",".join(PRICING_HEADER)] + [",".join([p, m, d.isoformat(), *a]) for p, m, d, a in rows]
    return "\n".join(lines) + "\n", rows


@settings(max_examples=100, deadline=None)
@given(case=pricing_csv(), usage_case=usages(), when=st.dates(date(2022, 1, 1), date(2027, 12, 31)),
       unknown=st.from_regex(r"[a-z]{1,8}", fullmatch=True))
def test_pricebook_cost_from_a_generated_pricing_csv(tmp_path_factory, case, usage_case, when, unknown):
    text, rows = case
    usage, parts = usage_case
    path = tmp_path_factory.mktemp("prices") / "pricing.csv"
    path.write_text(text, encoding="utf-8")
    book, problems = load_pricebook(path)
    assert problems == []
    at = datetime(when.year, when.month, when.day, 12, tzinfo=UTC)
    for provider, model in {(p, m) for p, m, _, _ in rows}:
        in_force = max((r for r in rows if r[:2] == (provider, model) and r[2] <= when), key=lambda r: r[2],
                       default=None)
        cost = book.cost(provider, model, at, usage)
        if in_force is None:  # before its first price: unpriced, never zero
            assert cost is None
            continue
        amounts = [Decimal(a) if a else None for a in in_force[3]]
        assert type(cost) is Decimal
        assert cost == by_hand(Price(in_force[2], *amounts), parts)
        assert book.cost(provider, model, at, Usage()) is None  # no usage reported at all: unknown
    assert book.cost("openai", "zz-unpriced-" + unknown, at, usage) is None
    assert book.cost("nosuch", rows[0][1], at, usage) is None


def test_cents_half_up_examples():
    assert cents(Decimal("0.005")) == Decimal("0.01")
    assert cents(Decimal("0.0049999")) == Decimal("0.00")
    assert cents(Decimal("0.015")) == Decimal("0.02")  # half-up, not banker's rounding (which gives 0.02 too)
    assert cents(Decimal("0.025")) == Decimal("0.03")  # banker's rounding would give 0.02
    assert cents(Decimal("-0.005")) == Decimal("-0.01")  # half away from zero
    assert str(cents(Decimal("3"))) == "3.00"


@settings(max_examples=300, deadline=None)
@given(x=_money, y=_money)
def test_cents_is_within_half_a_cent_and_monotone(x, y):
    c = cents(x)
    assert type(c) is Decimal
    assert c.as_tuple().exponent == -2
    assert abs(c - x) <= Decimal("0.005")
    if abs(c - x) == Decimal("0.005"):  # a tie always goes away from zero
        assert abs(c) > abs(x)
    if x <= y:
        assert cents(x) <= cents(y)
    assert cents(c) == c


# =================================================================================================
# HTTP surface of a real `tollway serve`
# =================================================================================================

PROVIDER_PREFIXES = {"openai": "/openai/v1/", "anthropic": "/anthropic/v1/", "gemini": "/gemini/v1beta/"}
_segment = st.from_regex(r"[A-Za-z0-9_~@:\-][A-Za-z0-9._~@:\-]{0,11}", fullmatch=True)
_known_rest = st.sampled_from([
    "chat/completions", "completions", "responses", "embeddings", "models", "models/gpt-4o-mini", "messages",
    "messages/count_tokens", "models/claude-sonnet-4-5", "models/gemini-2.5-flash:generateContent",
    "models/gemini-2.5-flash:streamGenerateContent", "models/gemini-2.5-flash:countTokens",
    "models/gpt-4o-mini:generateContent", "tunedModels/x:generateContent", "models/:generateContent", "",
])
_rest = st.one_of(_known_rest, st.lists(_segment, min_size=1, max_size=4).map("/".join),
                  st.tuples(_known_rest, _segment).map("/".join))
#: Integers stay below 10^27: larger ones are tested apart below.
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                         st.text(max_size=20))
_json = st.recursive(_json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=20)
_models = st.one_of(st.sampled_from(["gpt-4o-mini", "gpt-4o", "claude-sonnet-4-5", "claude-opus-4-5", " ",
                                     "gemini-2.5-flash", "openai/gpt-4o-mini", "*", "gpt-4o-mini\x00", "",
                                     "../../x", "a" * 300]), _json)
MAX_DEPTH = 40  # deeper bodies are tested apart below


def _nested(depth: int, leaf) -> object:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


@st.composite
def request_bodies(draw) -> bytes | None:
    kind = draw(st.sampled_from(["none", "bytes", "json", "model", "plausible", "deep"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    body = {"model": draw(_models)}
    if kind in ("plausible", "deep"):
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", 5])),
                             "content": draw(st.one_of(st.text(max_size=40), _json))}]
        for key, value in draw(st.dictionaries(
                st.sampled_from(["stream", "max_tokens", "max_completion_tokens", "stream_options", "contents",
                                 "generationConfig", "input", "system", "temperature"]),
                st.one_of(st.booleans(), st.integers(-5, 64), _json), max_size=4)).items():
            body[key] = value
    if kind == "deep":
        body["messages"].append(_nested(draw(st.integers(1, MAX_DEPTH)), draw(_json_scalar)))
    else:
        body.update(draw(st.dictionaries(st.text(max_size=8), _json, max_size=3)))
    return json.dumps(body).encode()


_AIMED = {  # (rest of path, models, credential header, token names) that reach the simulated provider
    "openai": (["chat/completions", "responses", "embeddings", "models", "models/gpt-4o-mini"],
               ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"], "authorization", ["alice", "carol", "bob"]),
    "anthropic": (["messages", "messages/count_tokens", "models"], ["claude-sonnet-4-5", "claude-opus-4-5",
                                                                    "claude-haiku-4-5"], "x-api-key",
                  ["alice", "dana", "bob"]),
    "gemini": (["models/gemini-2.5-flash:generateContent", "models/gemini-2.5-flash:streamGenerateContent",
                "models/gemini-2.5-pro:countTokens", "models/gemini-embedding-001:embedContent", "models"],
               ["gemini-2.5-flash"], "x-goog-api-key", ["carol", "alice"]),
}


@st.composite
def aimed_body(draw, target: str) -> bytes:
    """A body a provider would accept, with a few random extra or retyped fields."""
    models = _AIMED[target][1]
    text = draw(st.text(max_size=40))
    if target == "gemini":
        body: dict = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    else:
        body = {"model": draw(st.sampled_from(models)), "max_tokens": draw(st.integers(1, 32)),
                "messages": [{"role": "user", "content": text}], "input": text}
    body.update(draw(st.dictionaries(
        st.sampled_from(["stream", "max_tokens", "stream_options", "generationConfig", "model", "messages",
                         "contents", "x"]),
        st.one_of(st.booleans(), st.integers(-3, 32), _json, st.just({"include_usage": False}),
                  st.just({"maxOutputTokens": 8})), max_size=2)))
    if draw(st.booleans()):
        body["stream"] = True
    return json.dumps(body).encode()


@st.composite
def http_requests(draw, tokens: dict[str, str]):
    target = draw(st.sampled_from(["openai", "anthropic", "gemini", "nosuch", "healthz"]))
    query: dict[str, str] = {}
    headers = {f"x-fz-{k}": v for k, v in draw(st.dictionaries(
        st.from_regex(r"[a-z0-9\-]{1,10}", fullmatch=True),
        st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True), max_size=4)).items()}
    if target in PROVIDER_PREFIXES and draw(st.integers(0, 2)):  # aimed: mostly valid, reaches the provider
        rests, _, where, names = _AIMED[target]
        rest = draw(st.sampled_from(rests))
        path = PROVIDER_PREFIXES[target] + rest
        token = tokens[draw(st.sampled_from(names))]
        headers[where] = f"Bearer {token}" if where == "authorization" else token
        method = "GET" if rest.endswith("models") or "models/gpt" in rest else "POST"
        method = draw(st.sampled_from([method] * 4 + ["PUT", "DELETE", "PATCH"]))
        body = None if method == "GET" and draw(st.booleans()) else draw(aimed_body(target))
        if target == "gemini" and "stream" in rest and draw(st.booleans()):
            query["alt"] = "sse"
        return target, method, path, query, headers, body
    if target in PROVIDER_PREFIXES:
        path = PROVIDER_PREFIXES[target] + draw(_rest)
    elif target == "nosuch":
        path = "/nosuch/" + draw(_rest)
    else:
        path = "/healthz" + draw(st.sampled_from(["", "/", "/x"]))
    token = draw(st.sampled_from([*tokens.values(), "tw_not-a-real-token", "", None]))
    if token is not None:
        where = draw(st.sampled_from(["authorization", "x-api-key", "x-goog-api-key", "query"]))
        if where == "query":
            query["key"] = token
        else:
            headers[where] = f"Bearer {token}".strip() if where == "authorization" else token
    if target == "gemini" and draw(st.booleans()):
        query["alt"] = "sse"
    body = draw(request_bodies())
    if body is not None and draw(st.booleans()):
        headers["content-type"] = draw(st.sampled_from(["application/json", "text/plain",
                                                        "application/x-www-form-urlencoded"]))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    return target, method, path, query, headers, body


def assert_error_format(target: str, response: httpx.Response) -> None:
    """A refusal on a provider route is JSON in that provider's own error format."""
    assert "application/json" in response.headers.get("content-type", ""), response.headers
    payload = response.json()
    assert isinstance(payload, dict), payload
    error = payload.get("error")
    assert isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"], payload
    if target == "anthropic":
        assert payload["type"] == "error" and isinstance(error.get("type"), str), payload
    elif target == "gemini":
        assert error.get("code") == response.status_code and isinstance(error.get("status"), str), payload
        assert error["status"].isupper(), payload
    else:  # OpenAI, and the unknown-provider 404
        assert "type" in error and "code" in error, payload


def check_response(target: str, method: str, response: httpx.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if target == "healthz":
        if method == "GET" and response.request.url.path == "/healthz":
            assert response.status_code == 200 and response.json() == {"status": "ok"}
        return
    assert response.headers.get("x-tollway-request-id"), response.headers
    if target == "nosuch":
        assert response.status_code == 404
    if response.status_code >= 400:
        assert_error_format(target, response)


def test_random_requests_never_get_a_500_and_errors_use_the_route_format(gateway, deployment):
    """~150 hypothesis-generated requests against one real gateway; then it is still up, and its log holds
    no unhandled exception (a crash after the response started would not show as a 500)."""
    with httpx.Client(base_url=gateway.url, timeout=30) as client:

        @settings(max_examples=150, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(request=http_requests(deployment.tokens))
        def run(request):
            target, method, path, query, headers, body = request
            response = client.request(method, path, params=query, headers=headers, content=body)
            hypothesis_event(f"{target} {response.status_code}")
            check_response(target, method, response)

        run()
        assert client.get("/healthz").status_code == 200
    assert gateway.proc.poll() is None
    log = gateway.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def _deep_chat_body(depth: int) -> bytes:
    """A chat request whose one message content nests `depth` lists deep: valid JSON, a valid model."""
    return (b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth
            + b"}]}")


def test_moderately_nested_bodies_are_served(gateway, deployment):
    """Up to a few hundred levels, nesting is harmless (the fuzzing bound MAX_DEPTH is well below)."""
    token = deployment.tokens["alice"]
    for depth in (MAX_DEPTH, 100, 300):
        response = httpx.post(gateway.url + "/openai/v1/chat/completions", content=_deep_chat_body(depth),
                              headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
                              timeout=30)
        assert response.status_code == 200, (depth, response.status_code, response.text[:300])
    unauthenticated = httpx.post(gateway.url + "/openai/v1/chat/completions", content=_deep_chat_body(5000),
                                 timeout=30)
    assert unauthenticated.status_code == 401


@pytest.mark.parametrize("depth", [
    600,
    5000,
])
def test_deeply_nested_body_is_a_400_not_a_500(gateway, deployment, depth):
    token = deployment.tokens["alice"]
    response = httpx.post(gateway.url + "/openai/v1/chat/completions", content=_deep_chat_body(depth),
                          headers={"authorization": f"Bearer {token}", "content-type": "application/json"}, timeout=30)
    assert httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200
    assert response.status_code < 500, (response.status_code, response.text[:200])
    if response.status_code >= 400:
        assert_error_format("openai", response)



def test_huge_max_tokens_is_refused_not_a_500(gateway, deployment):
    body = b'{"model": "gpt-4o-mini", "max_tokens": 1' + b"0" * 27 + b', "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(gateway.url + "/openai/v1/chat/completions", content=body, timeout=30,
                          headers={"authorization": f"Bearer {deployment.tokens['alice']}"})
    assert httpx.get(gateway.url + "/healthz", timeout=5).status_code == 200
    assert response.status_code < 500, (response.status_code, response.text[:200])
    assert_error_format("openai", response)

# --- an upstream that answers 200 with oddly typed JSON ---------------------------------------------


ODD_BODY = b'{"id": "chatcmpl-odd", "object": "chat.completion", "choices": 5, ' \
           b'"usage": {"prompt_tokens": 3, "completion_tokens": 1}}'


class _OddUpstream(BaseHTTPRequestHandler):
    """A provider on loopback whose 200 answer is valid JSON with a non-list `choices`."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(ODD_BODY)))
        self.end_headers()
        self.wfile.write(ODD_BODY)

    def log_message(self, *args) -> None:
        pass


def test_oddly_typed_upstream_body_is_relayed_not_a_500(deployment):
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _OddUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    deployment.write_toml(providers={"openai": f"http://127.0.0.1:{upstream.server_address[1]}"})
    gw = GatewayProcess(deployment).start()
    try:
        response = httpx.post(gw.url + "/openai/v1/chat/completions", timeout=30,
                              headers={"authorization": f"Bearer {deployment.tokens['alice']}"},
                              json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        assert httpx.get(gw.url + "/healthz", timeout=5).status_code == 200
        assert (response.status_code, response.content) == (200, ODD_BODY)
    finally:
        gw.stop()
        upstream.shutdown()
        upstream.server_close()
