"""Unit tests for the incremental SSE parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.router.providers.sse import SSEEvent, SSEParser, SSEProtocolError

STREAM = (
    b": comment line\n"
    b"event: message_start\n"
    b'data: {"a": 1}\n'
    b"\n"
    b"data: line one\n"
    b"data: line two\n"
    b"id: 7\n"
    b"\n"
    b"event: ping\n"
    b"data:\n"
    b"\n"
    b"data:no-space\n"
    b"retry: 100\n"
    b"unknown: x\n"
    b"\n"
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SSEEvent("message_start", '{"a": 1}', ""),
    SSEEvent("message", "line one\nline two", "7"),
    SSEEvent("ping", "", "7"),
    SSEEvent("message", "no-space", "7"),
    SSEEvent("message", "[DONE]", "7"),
]


def _feed_all(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(parser.feed(c))
    return out


def test_whole_stream() -> None:
    assert _feed_all([STREAM]) == EXPECTED


def test_every_split_point_and_byte_by_byte() -> None:
    for i in range(len(STREAM) + 1):
        assert _feed_all([STREAM[:i], STREAM[i:]]) == EXPECTED, i
    assert _feed_all([bytes([b]) for b in STREAM]) == EXPECTED


@pytest.mark.parametrize("eol", [b"\r\n", b"\r", b"\n"])
def test_line_endings(eol: bytes) -> None:
    stream = STREAM.replace(b"\n", eol)
    assert _feed_all([stream]) == EXPECTED
    # CRLF split across chunks must not create an extra blank line
    assert _feed_all([bytes([b]) for b in stream]) == EXPECTED


def test_crlf_split_between_chunks_does_not_dispatch_early() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n\r\n") == [SSEEvent("message", "a\nb")]


def test_bom_and_utf8_split() -> None:
    text = "data: héllo ☃\n\n".encode()
    stream = b"\xef\xbb\xbf" + text
    assert _feed_all([bytes([b]) for b in stream]) == [SSEEvent("message", "héllo ☃")]


def test_event_without_data_is_not_dispatched_and_partial_is_reported() -> None:
    parser = SSEParser()
    assert parser.feed(b"event: x\n\n") == []
    assert parser.feed(b"data: incomplete") == []
    assert parser.has_partial_event
    assert parser.feed(b"\n") == []
    assert parser.has_partial_event
    assert parser.feed(b"\n") == [SSEEvent("message", "incomplete")]
    assert not parser.has_partial_event


def test_event_name_resets_after_dispatch() -> None:
    assert _feed_all([b"event: a\ndata: 1\n\ndata: 2\n\n"]) == [
        SSEEvent("a", "1"),
        SSEEvent("message", "2"),
    ]


def test_line_too_long() -> None:
    parser = SSEParser(max_line_bytes=16)
    with pytest.raises(SSEProtocolError):
        parser.feed(b"data: " + b"x" * 64)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_random_chunking(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [STREAM[a:b] for a, b in zip([0, *points], [*points, len(STREAM)], strict=True)]
    assert _feed_all(chunks) == EXPECTED
