"""HTTP `Range` for one byte range (RFC 9110 section 14). Pure.

containerd resumes downloads with single ranges; multiple ranges, other units and
malformed headers are ignored (the whole body is sent), as the RFC allows. Only a
well-formed range that lies wholly past the end is an error (416). Positions of any
length are read: one past `BEYOND` lies past the end of every blob.
"""

from __future__ import annotations

import re

from proxyd.errors import RangeNotSatisfiable

# RFC 9110's DIGIT is ASCII only (re's \d would also take other scripts' digits).
_BYTES_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE | re.ASCII)
BEYOND = 10**18  # bytes: more than any blob
_DIGITS = len(str(BEYOND))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte positions to send, or None for the whole body."""
    if not header:
        return None
    match = _BYTES_RANGE.fullmatch(header)
    if not match:
        return None
    first_text, last_text = (text.lstrip("0") or "0" if text else "" for text in match.groups())
    if not first_text and not last_text:
        return None
    if not first_text:  # suffix range: the last N bytes
        length = _position(last_text)
        if length == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(size - length, 0), size - 1
    if last_text and (len(last_text), last_text) < (len(first_text), first_text):
        return None  # invalid: ignored, not an error
    first = _position(first_text)
    last = _position(last_text) if last_text else size - 1
    if first >= size:
        raise _unsatisfiable(size)
    return first, min(last, size - 1)


def _position(digits: str) -> int:
    """Digits without leading zeros as a number, no greater than BEYOND: a client may
    send thousands (Python's int() refuses 4,300), and past BEYOND every one answers
    the same."""
    return BEYOND if len(digits) > _DIGITS else min(int(digits), BEYOND)


def content_range(first: int, last: int, size: int) -> str:
    return f"bytes {first}-{last}/{size}"


def _unsatisfiable(size: int) -> RangeNotSatisfiable:
    return RangeNotSatisfiable(
        f"range not satisfiable: the blob has {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
