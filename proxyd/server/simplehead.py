"""The requests remembered answers may answer: a strict reading of one request head.

Remembered answers (proxyd/server/fastpath.py) are written from the bytes a
connection received, before aiohttp's parser has seen them, so whatever this reading
lets through is answered without aiohttp's checks. It lets through only what every
parser reads the same way: one `GET` or `HEAD` head, HTTP/1.1, ASCII, every line
printable and ended by CRLF, one `Host`, at most one `X-Request-Id` and one
`Connection: keep-alive`, only headers known to change nothing about the answer, short
enough to be far inside aiohttp's own limits. Anything else, malformed or merely
unusual (a bare LF or CR, a NUL, a tab, obs-fold, a byte past ASCII, a body, a second
Host, a long line), is None: aiohttp reads it and decides, so the answer is the one
proxyd gives without remembered answers.

Clients ask for the same manifests with the same bytes again and again, so a reading
is remembered by those bytes (a bounded LRU): a repeated request costs a hash and a
lookup, not a parse. Pure.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

from proxyd.server.middleware import safe_request_id

# Request headers that cannot change the answer to a manifest by digest (Accept may
# choose a tag's answer: tag answers are kept per Accept lines). Anything else
# (conditions, ranges, credentials, bodies, upgrades) goes through aiohttp.
HARMLESS = frozenset(
    {
        "host",
        "user-agent",
        "accept",
        "accept-encoding",
        "accept-language",
        "docker-distribution-api-version",
        "x-request-id",
        "connection",
    }
)
# Far below aiohttp's limits (8190 bytes a line, 128 headers): a longer head is
# aiohttp's to judge, not a client's manifest request (containerd's and docker's are
# 300-600 bytes). It also bounds what the remembered readings hold: 2 MiB at most.
MAX_HEAD = 2048
MAX_HEADERS = 32
REMEMBERED_HEADS = 1024


class SimpleHead(NamedTuple):
    method: bytes  # GET or HEAD
    target: bytes  # as sent
    accept: bytes  # the Accept lines as `accept_key` makes them one
    request_id: str | None  # the client's X-Request-Id where it is safe to echo


def accept_key(lines: Iterable[bytes]) -> bytes:
    """A request's Accept lines as one key: in order, as the client sent them."""
    return b"\n".join(lines)


@functools.lru_cache(maxsize=REMEMBERED_HEADS)
def simple_head(data: bytes) -> SimpleHead | None:
    """`data` as one request head remembered answers may answer, or None."""
    end = len(data) - 4
    if end < 0 or len(data) > MAX_HEAD or not data.endswith(b"\r\n\r\n"):
        return None  # not a complete head (a part of one, or a body after it)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return None
    # A blank line before the end (a body, a second request) splits into an empty
    # line, which has no colon; a bare CR or LF stays in its line, not printable.
    lines = text[:end].split("\r\n")
    if len(lines) > MAX_HEADERS + 1:
        return None
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or request_line[2] != "HTTP/1.1":
        return None
    method, target = request_line[0], request_line[1]
    if (method != "GET" and method != "HEAD") or not target.isprintable():
        return None
    hosts = 0
    connection = False
    request_id = None
    accept = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        name = name.lower()  # a name with blanks or separators is not in HARMLESS
        if not colon or name not in HARMLESS or not value.isprintable():
            return None
        value = value.strip(" ")
        if name == "host":
            hosts += 1
        elif name == "accept":
            accept.append(value.encode())
        elif name == "x-request-id":
            if request_id is not None:
                return None
            request_id = value
        elif name == "connection":
            if connection or value.lower() != "keep-alive":
                return None
            connection = True
    if hosts != 1:
        return None
    safe_id = request_id if request_id is not None and safe_request_id(request_id) else None
    return SimpleHead(method.encode(), target.encode(), accept_key(accept), safe_id)
