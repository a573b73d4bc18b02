"""HTTP `Range` for one byte range (RFC 9110 section 14). Pure.

containerd resumes downloads with single ranges; multiple ranges, other units and
malformed headers are ignored (the whole body is sent), as the RFC allows. Only a
well-formed range that lies wholly past the end is an error (416).
"""

from __future__ import annotations

import re

from proxyd.errors import RangeNotSatisfiable

_BYTES_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte positions to send, or None for the whole body."""
    if not header:
        return None
    match = _BYTES_RANGE.fullmatch(header)
    if not match:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    if not first_text:  # suffix range: the last N bytes
        length = int(last_text)
        if length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # invalid: ignored, not an error
    if first >= size:
        raise _unsatisfiable(size)
    return first, min(last, size - 1)


def content_range(first: int, last: int, size: int) -> str:
    return f"bytes {first}-{last}/{size}"


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        f"range not satisfiable: the blob has {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
