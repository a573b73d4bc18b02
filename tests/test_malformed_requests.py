"""Malformed and hostile requests at the HTTP edge, spoken over raw TCP.

Remembered answers (proxyd/server/fastpath.py) are written straight from the bytes a
connection receives, ahead of aiohttp's parser. Whatever is odd about a request, the
rule is "when in doubt, aiohttp decides": a differential test sends each request of
a corpus to the app with remembered answers and to the same app without them, and
the answers must agree, status and echoed request id alike. Nothing a client sends
ever comes back as a header of its own.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyd.server.simplehead import simple_head
from tests.fakes import FakeImage, FakeRegistry, make_image
from tests.test_fastpath import fast, upstream_config

HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+: ?[\t -~]*")
FRESH_ID = re.compile(r"[0-9a-f]{16}")
SAFE_ID = re.compile(r"[A-Za-z0-9._:=+/-]{1,64}")  # what a client may have echoed
Build = Callable[[str], bytes]


def head(path: str, *lines: str | bytes, start: bytes | None = None) -> bytes:
    """A request head: `start` (the request line) and `lines`, CRLF-terminated."""
    first = start if start is not None else f"GET {path} HTTP/1.1".encode()
    encoded = [line.encode("latin-1") if isinstance(line, str) else line for line in lines]
    return b"\r\n".join([first, *encoded, b"", b""])


def plain(path: str, *lines: str | bytes) -> bytes:
    return head(path, "Host: proxyd", *lines)


def starting(request_line: str) -> Build:
    """A request with this request line (`{}` is the path) and a Host."""
    return lambda p: head(p, "Host: proxyd", start=request_line.format(p).encode("latin-1"))


# Each builds request bytes from the path of a manifest proxyd remembers an answer to.
WELL_FORMED: dict[str, Build] = {
    "well formed": lambda p: plain(p),
    "well formed HEAD": lambda p: plain(p).replace(b"GET", b"HEAD", 1),
    "header names in capitals": lambda p: head(p, "HOST: proxyd", "ACCEPT: */*"),
    "no space after the colon": lambda p: plain(p, "User-Agent:containerd"),
    "two Accept lines": lambda p: plain(p, "Accept: a/b", "Accept: c/d"),
    "a request id": lambda p: plain(p, "X-Request-Id: trace-42"),
    "a uuid request id": lambda p: plain(p, "X-Request-Id: 0b5c2a4e-6f0e-4c3e-9d1e-2a7b8c9d0e1f"),
}
CORPUS: dict[str, Build] = {
    **WELL_FORMED,
    "a tab in a value": lambda p: plain(p, "User-Agent:\tcontainerd/2.0\t"),
    # line endings
    "bare LF everywhere": lambda p: f"GET {p} HTTP/1.1\nHost: proxyd\n\n".encode(),
    "bare LF inside a header": lambda p: plain(p, "X-Request-Id: abc\nX-Injected: yes"),
    "bare LF inside the request line": starting("GET {}\nX-Injected: yes HTTP/1.1"),
    "bare LF ending the head": lambda p: plain(p)[:-2] + b"\n",
    "bare CR inside a header": lambda p: plain(p, "X-Request-Id: abc\rX-Injected: yes"),
    "bare CR ending a header": lambda p: plain(p, "Accept: a/b\r"),
    "CR CR LF": lambda p: plain(p).replace(b"proxyd\r\n", b"proxyd\r\r\n"),
    "LF CR": lambda p: plain(p, "Accept: a/b\n\r"),
    "an empty line first": lambda p: b"\r\n" + plain(p),
    # control characters and bytes past ASCII
    "NUL in a value": lambda p: plain(p, "Accept: a\x00b"),
    "NUL in the request id": lambda p: plain(p, "X-Request-Id: abc\x00def"),
    "NUL in a name": lambda p: plain(p, "Acc\x00ept: a/b"),
    "NUL after the version": starting("GET {} HTTP/1.1\0"),
    "a control character in a value": lambda p: plain(p, "User-Agent: a\x01b"),
    "DEL in a value": lambda p: plain(p, "User-Agent: a\x7fb"),
    "ESC in the request id": lambda p: plain(p, "X-Request-Id: \x1b[31mred"),
    "UTF-8 in a value": lambda p: plain(p, "User-Agent: caf\xc3\xa9"),
    "a byte past ASCII in a value": lambda p: plain(p, "User-Agent: \xff"),
    "a byte past ASCII in a name": lambda p: plain(p, "\xdcser-Agent: x"),
    "a byte past ASCII in the request id": lambda p: plain(p, "X-Request-Id: \xe9t\xe9"),
    # bodies on a GET
    "Content-Length 0": lambda p: plain(p, "Content-Length: 0"),
    "Content-Length with its body": lambda p: plain(p, "Content-Length: 5") + b"abcde",
    "Content-Length hidden behind a bare LF": lambda p: (
        plain(p, "Accept: a/b\nContent-Length: 5") + b"abcde"
    ),
    "two Content-Lengths": lambda p: plain(p, "Content-Length: 0", "Content-Length: 1") + b"x",
    "a negative Content-Length": lambda p: plain(p, "Content-Length: -1"),
    "a huge Content-Length": lambda p: plain(p, "Content-Length: " + "9" * 30),
    "chunked": lambda p: plain(p, "Transfer-Encoding: chunked") + b"0\r\n\r\n",
    "chunked and a length": lambda p: (
        plain(p, "Transfer-Encoding: chunked", "Content-Length: 5") + b"0\r\n\r\n"
    ),
    # Host
    "no Host": lambda p: head(p),
    "two Hosts": lambda p: head(p, "Host: proxyd", "Host: elsewhere"),
    "two equal Hosts": lambda p: head(p, "Host: proxyd", "Host: proxyd"),
    "an empty Host": lambda p: head(p, "Host:"),
    "a Host with a space": lambda p: head(p, "Host: prox yd"),
    "a Host with a slash": lambda p: head(p, "Host: proxyd/x"),
    "a Host with userinfo": lambda p: head(p, "Host: user@proxyd"),
    "a Host with a port": lambda p: head(p, "Host: proxyd:5000"),
    "an IPv6 Host": lambda p: head(p, "Host: [::1]:5000"),
    # header syntax
    "obs-fold": lambda p: plain(p, "Accept: a/b", " c/d"),
    "obs-fold with a tab": lambda p: plain(p, "User-Agent: a", "\tb"),
    "space before the colon": lambda p: plain(p, "Accept : a/b"),
    "space inside a name": lambda p: plain(p, "Acc ept: a/b"),
    "no colon": lambda p: plain(p, "Accept"),
    "an empty name": lambda p: plain(p, ": a/b"),
    "a separator in a name": lambda p: plain(p, "(Accept): a/b"),
    "a slash in a name": lambda p: plain(p, "Accept/x: a/b"),
    "two request ids": lambda p: plain(p, "X-Request-Id: one", "X-Request-Id: two"),
    "two Connection lines": lambda p: plain(p, "Connection: keep-alive", "Connection: close"),
    "Connection close": lambda p: plain(p, "Connection: close"),
    "Connection keep-alive": lambda p: plain(p, "Connection: keep-alive"),
    "Connection Keep-Alive": lambda p: plain(p, "Connection: Keep-Alive"),
    "Connection upgrade": lambda p: plain(p, "Connection: keep-alive, Upgrade", "Upgrade: h2c"),
    "Expect 100-continue": lambda p: plain(p, "Expect: 100-continue"),
    # request line
    "two spaces": starting("GET  {} HTTP/1.1"),
    "a tab for a space": starting("GET\t{} HTTP/1.1"),
    "a trailing space": starting("GET {} HTTP/1.1 "),
    "a lowercase method": starting("get {} HTTP/1.1"),
    "an unknown method": starting("GETS {} HTTP/1.1"),
    "a lowercase version": starting("GET {} http/1.1"),
    "HTTP/1.10": starting("GET {} HTTP/1.10"),
    "HTTP/2.0": starting("GET {} HTTP/2.0"),
    "no version": starting("GET {}"),
    "the absolute form": starting("GET http://proxyd{} HTTP/1.1"),
    "a fragment": starting("GET {}#x HTTP/1.1"),
    # sizes
    "an over-long header line": lambda p: plain(p, "User-Agent: " + "a" * 9000),
    "an over-long Accept": lambda p: plain(p, "Accept: " + "a/b, " * 2000),
    "an over-long name": lambda p: plain(p, "A" * 9000 + ": x"),
    "an over-long target": lambda p: plain(p + "?" + "x" * 9000),
    "a long request id": lambda p: plain(p, "X-Request-Id: " + "r" * 65),
    "a request id with a space": lambda p: plain(p, "X-Request-Id: a b"),
    "a request id with markup": lambda p: plain(p, "X-Request-Id: <script>x</script>"),
    "a request id with a quote": lambda p: plain(p, 'X-Request-Id: a"b'),
    "a request id with a semicolon": lambda p: plain(p, "X-Request-Id: a;b"),
    "an empty request id": lambda p: plain(p, "X-Request-Id:"),
    "the longest request id": lambda p: plain(p, "X-Request-Id: " + "r" * 64),
    "a request id with a trailing tab": lambda p: plain(p, "X-Request-Id: trace-4\t"),
    "200 Accept lines": lambda p: plain(p, *["Accept: a/b"] * 200),
    # not HTTP at all
    "a TLS ClientHello": lambda p: bytes.fromhex("16030100a5010000a10303") + b"\x00" * 32,
    "a request then garbage": lambda p: plain(p) + b"\x16\x03\x01garbage\r\n\r\n",
}


@dataclass(frozen=True)
class Answer:
    status: int | str  # or "closed": the connection closed without an answer
    request_id: str  # "echoed" (a safe id), "fresh", "" (none) or what came back
    head_ok: bool  # every header line well-formed, nothing injected


async def answer_to(proxyd: Any, data: bytes, sent_id: str | None) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxyd.server.port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except asyncio.IncompleteReadError:
            return Answer("closed", "", True)
    finally:
        writer.close()
    status_line, *lines = raw[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.lower().decode("latin-1")] = value.strip().decode("latin-1")
    echoed = headers.get("x-request-id", "")
    if sent_id is not None and echoed == sent_id and SAFE_ID.fullmatch(sent_id):
        request_id = "echoed"
    else:
        request_id = "fresh" if FRESH_ID.fullmatch(echoed) else echoed
    head_ok = (
        b"\n" not in raw[:-4].replace(b"\r\n", b"")
        and b"\r" not in raw[:-4].replace(b"\r\n", b"")
        and all(HEADER_LINE.fullmatch(line) for line in lines)
        and "x-injected" not in headers
    )
    return Answer(int(status_line.split(b" ")[1]), request_id, head_ok)


@pytest.fixture
async def hot(make_proxyd, start_fake) -> tuple[Any, FakeImage, str]:
    """proxyd with a remembered answer to one manifest by digest."""
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    proxyd = await make_proxyd(upstream_config(await start_fake(upstream)))
    path = f"/v2/team/app/manifests/{image.digest}"
    for cache in ("miss", "hit"):
        assert (await proxyd.get(path)).headers["X-Proxyd-Cache"] == cache
    return proxyd, image, path


def test_the_heads_of_real_clients_are_read_as_simple_ones():
    """What containerd and podman send for a manifest may be answered from memory."""
    target = "/v2/library/alpine/manifests/sha256:" + "a" * 64
    containerd = head(
        target,
        "Host: 127.0.0.1:5000",
        "User-Agent: containerd/v2.0.0",
        "Accept: application/vnd.docker.distribution.manifest.v2+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json, "
        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*",
        "Accept-Encoding: gzip",
    )
    podman = head(
        target,
        "Host: 127.0.0.1:5000",
        "User-Agent: containers/5.32.2 (github.com/containers/image)",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        "Docker-Distribution-Api-Version: registry/2.0",
        "Accept-Encoding: gzip",
    )
    reads = [simple_head(data) for data in (containerd, podman)]
    assert [(r.method, r.target, r.request_id) if r else None for r in reads] == [
        (b"GET", target.encode(), None)
    ] * 2
    assert reads[1] is not None and reads[1].accept == (
        b"application/vnd.oci.image.manifest.v1+json\n"
        b"application/vnd.docker.distribution.manifest.v2+json"
    )


def sent_request_id(data: bytes) -> str | None:
    """The X-Request-Id a request carries, as HTTP reads a field value: without the
    optional white space (spaces, tabs) around it (RFC 9110 5.5)."""
    match = re.search(rb"X-Request-Id:([^\r\n]*)\r\n", data)
    return match[1].strip(b" \t").decode("latin-1") if match else None


async def both_answers(proxyd: Any, data: bytes) -> tuple[Answer, Answer, bool]:
    """The answer with remembered answers, the answer without them, and whether the
    first came from memory."""
    answers = fast(proxyd)
    answers.enabled = True
    before = answers.answered
    with_memory = await answer_to(proxyd, data, sent_request_id(data))
    from_memory = answers.answered > before
    answers.enabled = False
    try:
        without = await answer_to(proxyd, data, sent_request_id(data))
    finally:
        answers.enabled = True
    return with_memory, without, from_memory


async def test_every_request_gets_the_same_answer_with_and_without_remembered_answers(hot):
    proxyd, _, path = hot
    differences = {}
    from_memory = set()
    for name, build in CORPUS.items():
        with_memory, without, answered = await both_answers(proxyd, build(path))
        if with_memory != without or not with_memory.head_ok:
            differences[name] = (with_memory, without)
        elif with_memory.request_id not in ("echoed", "fresh", ""):
            differences[name] = (with_memory, "echoes an unsafe request id")
        if answered:
            from_memory.add(name)
    assert differences == {}
    assert from_memory >= set(WELL_FORMED)  # the test meets remembered answers at all


# Bytes that change how a head parses, and a few that change nothing.
TRICKY = st.sampled_from([b"\r", b"\n", b"\r\n", b"\0", b"\t", b" ", b":", b"\x7f", b"\xff", b"a"])


@st.composite
def mutated(draw: st.DrawFn, path: str) -> bytes:
    """A well-formed request with one to three bytes inserted, replaced or deleted
    inside its head (its final blank line kept, so every head is complete)."""
    data = bytearray(draw(st.sampled_from(list(WELL_FORMED.values())))(path))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 5))
        action = draw(st.sampled_from(["insert", "replace", "delete"]))
        if action == "delete":
            del data[at]
        else:
            data[at : at + (action == "replace")] = draw(TRICKY)
    return bytes(data)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_a_mutated_request_gets_the_same_answer_with_and_without_remembered_answers(
    hot, data
):
    proxyd, _, path = hot
    request = data.draw(mutated(path), label="request")
    with_memory, without, _ = await both_answers(proxyd, request)
    assert with_memory == without
    assert with_memory.head_ok
    assert with_memory.request_id in ("echoed", "fresh", "")
