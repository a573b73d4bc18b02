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


HUGE = "9" * 5000  # past Python's 4,300-digit limit for int()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"bytes=0-{HUGE}", (0, 99)),  # the end is clamped
        (f"bytes=-{HUGE}", (0, 99)),  # all of it
        (f"bytes=10-{'0' * 5000}12", (10, 12)),  # leading zeros are no size
        (f"bytes={HUGE}-1", None),  # the end before the start: ignored
        (f"bytes=2{'0' * 30}-1{'0' * 30}", None),  # also where both are past BEYOND
        ("bytes=\u0663-", None),  # an Arabic-Indic 3: not a DIGIT
    ],
)
def test_positions_of_any_length_are_read_exactly(header, expected):
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", [f"bytes={HUGE}-", f"bytes={HUGE}-{HUGE}9"])
def test_a_start_of_thousands_of_digits_is_past_the_end(header):
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def exact(first: int | None, last: int | None, size: int) -> tuple[int, int] | str | None:
    """RFC 9110's reading of `bytes=first-last`, in unbounded integers."""
    if first is None:
        assert last is not None
        return "416" if last == 0 or size == 0 else (max(size - last, 0), size - 1)
    if last is not None and last < first:
        return None
    return "416" if first >= size else (first, min(size - 1 if last is None else last, size - 1))


positions = st.one_of(st.integers(0, 10**6), st.integers(0, 10**40), st.none())


@settings(max_examples=500, deadline=None)
@given(first=positions, last=positions, size=st.integers(0, 10**12))
def test_a_range_is_read_as_unbounded_integers_would_read_it(first, last, size):
    if first is None and last is None:
        return
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    try:
        got: tuple[int, int] | str | None = parse_range(header, size)
    except RangeNotSatisfiable:
        got = "416"
    assert got == exact(first, last, size)
