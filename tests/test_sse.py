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


# --- the event cap ----------------------------------------------------------------------------------
LONG = b"data: " + b"x" * 200 + b"\n\n"  # 208 bytes: one event far past a 64-byte cap
AFTER = [SseEvent(b"event: e\ndata: after\n\n", "e", b"after"), SseEvent(b"data: last\n\n", None, b"last")]


def feed_all(parser: SseParser, chunks: list[bytes]) -> list[SseEvent]:
    events: list[SseEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events + parser.close()


@pytest.mark.parametrize("size", [1, 7, 16, 64, 200], ids=lambda n: f"chunks-of-{n}")
def test_an_event_past_the_cap_comes_back_in_unread_pieces_then_parsing_resumes(size):
    stream = LONG + b"".join(e.raw for e in AFTER)
    parser = SseParser(max_event_bytes=64)
    events = feed_all(parser, [stream[i:i + size] for i in range(0, len(stream), size)])
    unread = [e for e in events if e.unread]
    assert events[:len(unread)] == unread and len(unread) >= 2  # the long event's pieces come first
    assert b"".join(e.raw for e in unread) == LONG  # every byte of it, once, in order
    assert all(e.event is None and e.data == b"" for e in unread)  # nothing is read from them
    assert all(len(e.raw) <= 64 + size for e in unread)
    assert events[len(unread):] == AFTER


def test_the_cap_is_on_what_is_held_so_an_event_completed_within_one_chunk_is_read():
    stream = LONG + b"".join(e.raw for e in AFTER)
    assert SseParser(max_event_bytes=64).feed(stream) == [SseEvent(LONG, None, b"x" * 200), *AFTER]


@pytest.mark.parametrize("boundary", [b"\n\n", b"\r\n\r\n", b"\r\r"], ids=["LF", "CRLF", "CR"])
def test_a_boundary_split_where_the_cap_cuts_is_still_found(boundary):
    """The cut keeps the last 3 bytes: a boundary that began in them is found when its last byte arrives."""
    long = b"data: " + b"y" * 40  # 46 bytes: past the cap of 8 as soon as it is fed
    stream = long + boundary + b"data: z" + boundary
    for cut in range(len(long) - 3, len(long) + len(boundary)):  # the first chunk ends at or inside the boundary
        parser = SseParser(max_event_bytes=8)
        events = feed_all(parser, [stream[:cut], stream[cut:]])
        assert b"".join(e.raw for e in events) == stream, cut
        assert events[-1] == SseEvent(b"data: z" + boundary, None, b"z"), cut
        assert all(e.unread for e in events[:-1]), cut


def test_close_inside_an_event_past_the_cap_hands_back_its_rest_unread():
    parser = SseParser(max_event_bytes=16)
    data = b"data: " + b"q" * 100  # no boundary, and the stream ends
    pieces = parser.feed(data)
    assert pieces and all(e.unread for e in pieces)
    rest = parser.close()
    assert [e.unread for e in rest] == [True]
    assert b"".join(e.raw for e in pieces + rest) == data
    assert parser.close() == [] and parser.feed(b"data: ok\n\n") == [SseEvent(b"data: ok\n\n", None, b"ok")]


class _CountingPattern:
    """Stands in for the parser's boundary regex and counts the bytes each search covers."""

    def __init__(self, pattern) -> None:
        self.pattern, self.scanned, self.searches = pattern, 0, 0

    def finditer(self, string, pos=0, *args):
        self.scanned += len(string) - pos
        self.searches += 1
        return self.pattern.finditer(string, pos, *args)


def test_20_mb_without_a_boundary_is_linear_work_in_bounded_memory(monkeypatch):
    """Fed in 1 KiB chunks: the parser never holds more than the cap plus a chunk, every byte comes back
    once, and the boundary search covers each byte once plus a 3-byte overlap per feed (counted, not timed:
    searching from the start of the unfinished event at each feed would cover about 170 MB here, and
    without the cap 20480 x 20481 / 2 KiB, about 200 GiB)."""
    import proxy.sse
    counting = _CountingPattern(proxy.sse._BOUNDARY)
    monkeypatch.setattr(proxy.sse, "_BOUNDARY", counting)
    cap, chunk = 16 * 1024, b"data: " + b"w" * 1017 + b"\n"  # 1 KiB, one LF: never a blank line
    feeds = 20 * 1024  # 20 MiB
    parser = SseParser(max_event_bytes=cap)
    returned = held_most = 0
    for _ in range(feeds):
        for event in parser.feed(chunk):
            assert event.unread
            returned += len(event.raw)
        held = len(parser.pending())
        held_most = max(held_most, held)
        assert held <= cap + len(chunk)
    assert returned + held == feeds * 1024  # nothing lost or doubled so far
    assert cap - len(chunk) <= held_most <= cap + len(chunk)
    assert counting.searches == feeds
    assert feeds * 1024 <= counting.scanned <= feeds * (1024 + 3)
    # and the boundary, when it finally comes, ends the long event; what follows is read again
    tail = parser.feed(b"\ndata: back\n\n")  # the pending line's own LF and this one make the blank line
    assert [e.unread for e in tail] == [True, False] and tail[0].raw.endswith(b"w\n\n")
    assert returned + len(tail[0].raw) == feeds * 1024 + 1
    assert tail[1] == SseEvent(b"data: back\n\n", None, b"back")
