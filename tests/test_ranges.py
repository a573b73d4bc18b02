"""Single byte ranges, as containerd sends them to resume a download."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyd.errors import RangeNotSatisfiable
from proxyd.ranges import parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),  # a suffix longer than the blob is all of it
        ("bytes=90-1000", 100, (90, 99)),  # the end is clamped
        ("BYTES = 1 - 2", 100, (1, 2)),
    ],
)
def test_a_satisfiable_range_gives_inclusive_positions(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    "header",
    [None, "", "items=0-1", "bytes=0-1,5-6", "bytes=5-2", "bytes=-", "bytes=a-b", "bytes 0-1"],
)
def test_other_units_several_ranges_and_malformed_ranges_are_ignored(header):
    assert parse_range(header, 100) is None


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0)]
)
def test_a_range_past_the_end_is_unsatisfiable_and_says_the_size(header, size):
    with pytest.raises(RangeNotSatisfiable) as raised:
        parse_range(header, size)
    assert raised.value.headers["Content-Range"] == f"bytes */{size}"


@settings(max_examples=300, deadline=None)
@given(header=st.text(max_size=40), size=st.integers(0, 10**12))
def test_any_header_gives_positions_inside_the_blob_or_none_or_416(header, size):
    try:
        span = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if span is not None:
        first, last = span
        assert 0 <= first <= last < size


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 10**9), data=st.data())
def test_every_wellformed_range_inside_the_blob_is_served_exactly(size, data):
    first = data.draw(st.integers(0, size - 1))
    last = data.draw(st.integers(first, size - 1))
    assert parse_range(f"bytes={first}-{last}", size) == (first, last)
