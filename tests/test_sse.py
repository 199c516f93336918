"""The incremental SSE parser: field syntax, framing, end of stream, and split invariance."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sse import SseEvent, SseParser, parse_event

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def parse_all(data: bytes, chunks: list[bytes] | None = None) -> list[SseEvent]:
    """Feed `chunks` (or `data` whole) then close: every event the stream holds."""
    parser = SseParser()
    events: list[SseEvent] = []
    for chunk in chunks if chunks is not None else [data]:
        events.extend(parser.feed(chunk))
    events.extend(parser.close())
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# --- field syntax --------------------------------------------------------------------------------
@pytest.mark.parametrize("line, expected", [
    (b"data: hello", b"hello"),
    (b"data:hello", b"hello"),
    (b"data:  two spaces", b" two spaces"),  # only the one space after the colon is dropped
    (b"data:", b""),
    (b"data: {\"a\": 1}", b"{\"a\": 1}"),
    (b"data: a: b", b"a: b"),  # a colon inside the value is part of the value
])
def test_data_with_and_without_space(line, expected):
    events = SseParser().feed(line + b"\n\n")
    assert len(events) == 1
    assert events[0].data == expected
    assert events[0].event is None


def test_multi_line_data_is_joined_with_newline():
    [event] = SseParser().feed(b"data: first\ndata:second\ndata: third\n\n")
    assert event.data == b"first\nsecond\nthird"


def test_empty_data_line_between_others_keeps_its_place():
    [event] = SseParser().feed(b"data: a\ndata:\ndata: b\n\n")
    assert event.data == b"a\n\nb"


def test_event_names():
    events = SseParser().feed(b"event: message_start\ndata: {}\n\nevent:ping\ndata: {}\n\ndata: x\n\n")
    assert [e.event for e in events] == ["message_start", "ping", None]
    assert [e.data for e in events] == [b"{}", b"{}", b"x"]


def test_last_event_name_wins_and_order_of_fields_does_not_matter():
    [event] = SseParser().feed(b"data: x\nevent: one\nevent: two\n\n")
    assert event.event == "two"
    assert event.data == b"x"


def test_comments_and_unknown_fields_are_ignored_but_kept_in_raw():
    raw = b": keep-alive\nid: 42\nretry: 1000\ndata: payload\n: another comment\n\n"
    [event] = SseParser().feed(raw)
    assert event.data == b"payload"
    assert event.event is None
    assert event.raw == raw


def test_comment_only_event_has_no_data():
    [event] = SseParser().feed(b": ping\n\n")
    assert event.data == b""
    assert event.event is None
    assert event.raw == b": ping\n\n"


def test_a_data_line_that_only_looks_like_a_comment():
    [event] = SseParser().feed(b"data: : not a comment\n\n")
    assert event.data == b": not a comment"


# --- framing --------------------------------------------------------------------------------------
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_framing(newline):
    stream = newline.join([b"event: a", b"data: one", b"data: two", b"", b"data: three", b"", b""])
    events = SseParser().feed(stream)
    assert [(e.event, e.data) for e in events] == [("a", b"one\ntwo"), (None, b"three")]
    assert b"".join(e.raw for e in events) == stream


def test_raw_includes_the_blank_line_terminator():
    events = SseParser().feed(b"data: a\r\n\r\ndata: b\r\n\r\n")
    assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]


def test_incomplete_event_is_held_back_until_its_blank_line():
    parser = SseParser()
    assert parser.feed(b"data: par") == []
    assert parser.feed(b"tial\n") == []
    assert parser.pending() == b"data: partial\n"
    [event] = parser.feed(b"\n")
    assert event.data == b"partial"
    assert parser.pending() == b""


def test_crlf_terminator_split_between_chunks():
    parser = SseParser()
    assert parser.feed(b"data: a\r\n\r") == []
    [event] = parser.feed(b"\ndata: b")
    assert event.data == b"a"
    assert event.raw == b"data: a\r\n\r\n"
    assert parser.pending() == b"data: b"


def test_many_events_in_one_chunk_come_out_in_order():
    stream = b"".join(b"data: %d\n\n" % i for i in range(50))
    assert [e.data for e in SseParser().feed(stream)] == [str(i).encode() for i in range(50)]


# --- end of stream --------------------------------------------------------------------------------
def test_close_yields_a_final_unterminated_event():
    parser = SseParser()
    assert parser.feed(b"data: done\n\ndata: tail\nevent: last") == [SseEvent(b"data: done\n\n", None, b"done")]
    [event] = parser.close()
    assert event.data == b"tail"
    assert event.event == "last"
    assert event.raw == b"data: tail\nevent: last"
    assert parser.close() == []  # the buffer is gone


def test_close_with_a_single_newline_left_still_yields_the_event():
    parser = SseParser()
    parser.feed(b"data: [DONE]\n")
    [event] = parser.close()
    assert event.data == b"[DONE]"


@pytest.mark.parametrize("rest", [b"", b"\n", b"\r\n", b"  \r\n"])
def test_close_without_content_yields_nothing(rest):
    parser = SseParser()
    parser.feed(b"data: x\n\n" + rest)
    assert parser.close() == []


def test_parse_event_directly():
    event = parse_event(b"event: e\r\ndata: 1\r\ndata: 2\r\n\r\n")
    assert event == SseEvent(b"event: e\r\ndata: 1\r\ndata: 2\r\n\r\n", "e", b"1\n2")


def test_invalid_utf8_event_name_does_not_raise():
    [event] = SseParser().feed(b"event: \xff\xfe\ndata: \xff\n\n")
    assert event.data == b"\xff"
    assert isinstance(event.event, str)


# --- split invariance -----------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.sse")))
def test_fixture_every_two_chunk_split_gives_the_same_events(fixture):
    data = (FIXTURES / fixture).read_bytes()
    whole = parse_all(data)
    assert whole and b"".join(e.raw for e in whole) == data
    for i in range(len(data) + 1):
        assert parse_all(data, [data[:i], data[i:]]) == whole, f"split at byte {i}"


def test_fixture_one_byte_at_a_time():
    data = (FIXTURES / "anthropic_messages_stream.sse").read_bytes()
    assert parse_all(data, [data[i:i + 1] for i in range(len(data))]) == parse_all(data)


_PIECES = st.sampled_from([
    b"data: ", b"data:", b"event: ", b"event:", b": comment", b"id: 7", b"retry: 10",
    b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n", b"\r\r",
    b"{\"a\": 1}", b"[DONE]", b"x", b" ", b":", b"\xe2\x82\xac", b"\xff",
])
sse_like = st.lists(st.one_of(_PIECES, st.binary(max_size=6)), max_size=40).map(b"".join)


@st.composite
def stream_and_cuts(draw, streams=sse_like):
    data = draw(streams)
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return data, cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_and_cuts())
def test_any_split_gives_the_same_events_as_the_whole(case):
    data, cuts = case
    whole = parse_all(data)
    chunked = parse_all(data, split_at(data, cuts))
    assert [(e.raw, e.event, e.data) for e in chunked] == [(e.raw, e.event, e.data) for e in whole]


@settings(max_examples=200, deadline=None)
@given(stream_and_cuts(st.binary(max_size=200)))
def test_any_split_of_arbitrary_bytes_gives_the_same_events(case):
    data, cuts = case
    assert parse_all(data, split_at(data, cuts)) == parse_all(data)


@settings(max_examples=200, deadline=None)
@given(stream_and_cuts())
def test_no_byte_is_lost_or_invented(case):
    """Every byte fed comes out in exactly one event's raw, or is still pending (whitespace only)."""
    data, cuts = case
    parser = SseParser()
    raws = []
    for chunk in split_at(data, cuts):
        raws.extend(e.raw for e in parser.feed(chunk))
    pending = parser.pending()
    assert b"".join(raws) + pending == data
    tail = parser.close()
    if tail:
        assert [e.raw for e in tail] == [pending]
    else:
        assert pending.strip() == b""
