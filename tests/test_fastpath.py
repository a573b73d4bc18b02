"""Remembered answers to manifest and tag hits (proxyd/server/fastpath.py), spoken to
over raw TCP: they must be byte-for-byte what the handler would say, and every request
they may not answer must reach aiohttp untouched."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.reference import Digest
from proxyd.server import fastpath
from proxyd.server.fastpath import FAST, FastAnswers
from proxyd.server.keys import PULLER, RUNTIME
from tests.conftest import FakeClock, host, origin
from tests.fakes import FakeImage, FakeRegistry, make_image
from tests.test_inbound import basic, write_htpasswd


def upstream_config(server: Any, *extra: str) -> str:
    return "\n".join(
        [
            *extra,
            f'default_namespace = "{host(server)}"',
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
        ]
    )


class Connection:
    """One keep-alive TCP connection to proxyd, written and read by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, proxyd: Any) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", proxyd.server.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = raw.decode("latin-1").split("\r\n")[:-2]
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        length = 0 if head else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return int(status_line.split(" ")[1]), headers, body

    async def closed(self) -> bool:
        return await asyncio.wait_for(self.reader.read(1), 5) == b""

    def close(self) -> None:
        self.writer.close()


def get(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: proxyd", *headers, "", ""]
    return "\r\n".join(lines).encode()


@pytest.fixture
async def served(make_proxyd, start_fake) -> tuple[Any, FakeImage, str]:
    """proxyd with one manifest by digest fetched, then served from the store (which
    is when an answer is remembered)."""
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    proxyd = await make_proxyd(upstream_config(await start_fake(upstream)))
    path = f"/v2/team/app/manifests/{image.digest}"
    for cache in ("miss", "hit"):
        assert (await proxyd.get(path)).headers["X-Proxyd-Cache"] == cache
    return proxyd, image, path


def fast(proxyd: Any) -> FastAnswers:
    answers: FastAnswers = proxyd.server.app[FAST]
    return answers


async def test_a_remembered_hit_is_answered_as_the_handler_answers_it(served):
    proxyd, image, path = served
    conn = await Connection.open(proxyd)
    await conn.send(get(path, "Accept: application/vnd.oci.image.manifest.v1+json"))
    second = await conn.response()
    conn.close()
    first = await proxyd.get(path, headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})

    assert fast(proxyd).answered == 2  # aiohttp's own client sends only harmless headers
    assert second[0] == first.status == 200
    assert second[2] == await first.read() == image.manifest
    varying = {"date", "x-request-id"}
    assert {k: v for k, v in second[1].items() if k not in varying} == {
        k.lower(): v for k, v in first.headers.items() if k.lower() not in varying
    }
    assert second[1]["docker-content-digest"] == image.digest
    assert second[1]["x-proxyd-cache"] == "hit"
    assert len(second[1]["x-request-id"]) == 16


async def test_head_gets_the_length_and_no_body_and_the_request_id_is_echoed(served):
    proxyd, image, path = served
    conn = await Connection.open(proxyd)
    await conn.send(get(path, "X-Request-Id: trace-42", method="HEAD"))
    status, headers, _ = await conn.response(head=True)
    await conn.send(get(path))  # the connection goes on: nothing stray was sent
    assert (await conn.response())[2] == image.manifest
    conn.close()

    assert fast(proxyd).answered == 2
    assert status == 200
    assert headers["content-length"] == str(len(image.manifest))
    assert headers["x-request-id"] == "trace-42"


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(lambda p: get(p, "If-None-Match: *"), id="a condition"),
        pytest.param(lambda p: get(p, "Range: bytes=0-1"), id="a range"),
        pytest.param(lambda p: get(p, "Authorization: Basic Zm9vOmJhcg=="), id="credentials"),
        pytest.param(lambda p: get(p, "X-Unknown: 1"), id="an unknown header"),
        pytest.param(lambda p: get(p).replace(b"HTTP/1.1", b"HTTP/1.0"), id="HTTP/1.0"),
        pytest.param(lambda p: get(p + "?ns=elsewhere"), id="another target"),
    ],
)
async def test_requests_it_may_not_answer_go_through_aiohttp(served, request_bytes):
    proxyd, _, path = served
    conn = await Connection.open(proxyd)
    await conn.send(request_bytes(path))
    status, _, _ = await conn.response()
    conn.close()
    assert fast(proxyd).answered == 0
    assert status in (200, 206, 400, 404)


async def test_connection_close_is_honoured_by_aiohttp(served):
    proxyd, image, path = served
    conn = await Connection.open(proxyd)
    await conn.send(get(path, "Connection: close"))
    assert (await conn.response())[2] == image.manifest
    assert await conn.closed()
    assert fast(proxyd).answered == 0


async def test_pipelined_and_split_requests_are_answered_in_order(served):
    proxyd, image, path = served
    conn = await Connection.open(proxyd)
    await conn.send(get(path) + get("/v2/team/app/manifests/v1") + get(path, method="HEAD"))
    assert (await conn.response())[2] == image.manifest
    assert (await conn.response())[2] == image.manifest
    assert (await conn.response(head=True))[0] == 200
    request = get(path)
    await conn.send(request[:20])  # half a request: the parser holds it
    await asyncio.sleep(0.05)
    await conn.send(request[20:])
    assert (await conn.response())[2] == image.manifest
    await conn.send(get(path))  # back at a boundary: answered from memory again
    assert (await conn.response())[2] == image.manifest
    conn.close()
    assert fast(proxyd).answered == 1


async def test_a_body_that_looks_like_a_request_is_not_answered(served):
    """Bytes inside a request body are never mistaken for a request of their own."""
    proxyd, _, path = served
    conn = await Connection.open(proxyd)
    hidden = get(path)
    head = (
        f"PUT /v2/team/app/manifests/v2 HTTP/1.1\r\nHost: proxyd\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(hidden) + 10}\r\n\r\n"
    ).encode()
    await conn.send(head)
    await asyncio.sleep(0.05)
    await conn.send(hidden)  # the first part of the body: a complete-looking GET
    await asyncio.sleep(0.05)
    await conn.send(b"0123456789")
    status, _, _ = await conn.response()
    conn.close()
    assert status >= 400  # pushes are not allowed here: refused
    assert fast(proxyd).answered == 0


async def test_a_delete_through_this_proxyd_ends_remembered_answers_at_once(served):
    proxyd, image, path = served
    namespace = proxyd.server.app[RUNTIME].settings.default_namespace
    store = proxyd.server.app[PULLER].store
    store.unlink(namespace, "team/app", Digest.parse(image.digest), "_manifests")
    conn = await Connection.open(proxyd)
    await conn.send(get(path))
    status, headers, _ = await conn.response()
    conn.close()
    assert fast(proxyd).answered == 0
    assert headers["x-proxyd-cache"] == "miss"  # asked upstream again
    assert status == 200


async def test_answers_are_logged_and_counted_like_the_handlers(served):
    proxyd, image, path = served
    conn = await Connection.open(proxyd)
    with capture_logs() as logs:
        await conn.send(get(path, "X-Request-Id: r1"))
        await conn.response()
    conn.close()
    (event,) = [e for e in logs if e["event"] == "request"]
    assert event["method"] == "GET" and event["path"] == path
    assert event["status"] == 200 and event["cache"] == "hit"
    assert event["bytes"] == len(image.manifest) and event["request_id"] == "r1"
    assert event["repository"] == "team/app"
    metrics = (await (await proxyd.get("/metrics")).text()).splitlines()
    assert 'proxyd_requests_total{method="GET",route="manifests",status="200"} 3.0' in metrics


async def test_answers_are_timed_in_the_request_histogram_by_the_next_scrape(served):
    proxyd, _image, path = served

    async def timed() -> float:
        text = await (await proxyd.get("/metrics")).text()
        (line,) = [
            line
            for line in text.splitlines()
            if line.startswith('proxyd_request_duration_seconds_count{route="manifests"}')
        ]
        return float(line.rsplit(" ", 1)[1])

    before, answered = await timed(), fast(proxyd).answered
    conn = await Connection.open(proxyd)
    for method in ("GET", "HEAD", "GET"):
        await conn.send(get(path, method=method))
        await conn.response(head=method == "HEAD")
    conn.close()
    assert fast(proxyd).answered - answered == 3
    assert await timed() - before == 3


async def test_where_every_pull_authenticates_nothing_is_answered_from_memory(
    make_proxyd, start_fake, tmp_path: Path
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    htpasswd = write_htpasswd(tmp_path / "htpasswd")
    proxyd = await make_proxyd(
        upstream_config(
            await start_fake(upstream), f'htpasswd = "{htpasswd}"', 'auth_required = "all"'
        )
    )
    path = f"/v2/team/app/manifests/{image.digest}"
    assert (await proxyd.get(path, headers=basic("alice", "wonderland"))).status == 200
    conn = await Connection.open(proxyd)
    await conn.send(get(path))
    status, _, _ = await conn.response()
    conn.close()
    assert status == 401
    assert not fast(proxyd).enabled and fast(proxyd).answered == 0


async def test_without_manifest_memory_nothing_is_answered_from_it(make_proxyd, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    proxyd = await make_proxyd(
        upstream_config(await start_fake(upstream)) + "\n[cache]\nmanifest_memory = 0\n"
    )
    path = f"/v2/team/app/manifests/{image.digest}"
    caches = [(await proxyd.get(path)).headers["X-Proxyd-Cache"] for _ in range(3)]
    assert caches == ["miss", "hit", "hit"]  # from the store, read each time
    assert fast(proxyd).answered == 0


async def test_an_aiohttp_whose_protocol_differs_runs_without_remembered_answers(
    make_proxyd, start_fake, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(
        fastpath, "NEEDED_PROTOCOL_STATE", (*fastpath.NEEDED_PROTOCOL_STATE, "_gone_in_4_0")
    )
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    with capture_logs() as logs:
        proxyd = await make_proxyd(upstream_config(await start_fake(upstream)))
    path = f"/v2/team/app/manifests/{image.digest}"
    for _ in range(3):
        assert await (await proxyd.get(path)).read() == image.manifest
    assert not fast(proxyd).enabled and fast(proxyd).answered == 0
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["fastpath.off"]


OCI = "application/vnd.oci.image.manifest.v1+json"
DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
TAG = "/v2/team/app/manifests/v1"


async def tag_twice(
    make_proxyd: Any, start_fake: Any, *namespace_keys: str, clock: Clock = SYSTEM_CLOCK
) -> Any:
    """proxyd after a tag was asked for twice (fetched, then answered from memory),
    with the Accept lines of containerd's and docker's resolvers."""
    upstream = FakeRegistry()
    upstream.add(make_image())
    proxyd = await make_proxyd(
        upstream_config(await start_fake(upstream)) + "\n".join(["", *namespace_keys]),
        clock=clock,
    )
    conn = await Connection.open(proxyd)
    for cache in ("miss", "hit"):
        await conn.send(get(TAG, f"Accept: {OCI}", f"Accept: {DOCKER}"))
        assert (await conn.response())[1]["x-proxyd-cache"] == cache
    conn.close()
    return proxyd


async def tag_once_more(proxyd: Any) -> tuple[int, str]:
    """The status and X-Proxyd-Cache of the tag asked for as `tag_twice` asked."""
    conn = await Connection.open(proxyd)
    await conn.send(get(TAG, f"Accept: {OCI}", f"Accept: {DOCKER}"))
    status, headers, _ = await conn.response()
    conn.close()
    return status, headers["x-proxyd-cache"]


async def test_a_fresh_tag_is_answered_from_the_connection_for_the_same_accept_lines(
    make_proxyd, start_fake
):
    proxyd = await tag_twice(make_proxyd, start_fake)
    conn = await Connection.open(proxyd)
    await conn.send(get(TAG, f"Accept: {OCI}", f"Accept: {DOCKER}"))
    fast_answer = await conn.response()
    assert fast(proxyd).answered == 1
    await conn.send(get(TAG, f"Accept: {DOCKER}"))  # another Accept: another answer
    other = await conn.response()
    assert fast(proxyd).answered == 1
    conn.close()
    handler = await proxyd.get(TAG, headers={"Accept": f"{OCI}, {DOCKER}"})

    status, headers, body = fast_answer
    assert status == other[0] == handler.status == 200
    assert body == await handler.read()
    varying = {"date", "x-request-id"}
    assert {k: v for k, v in headers.items() if k not in varying} == {
        k.lower(): v for k, v in handler.headers.items() if k.lower() not in varying
    }
    metrics = (await (await proxyd.get("/metrics")).text()).splitlines()
    assert 'proxyd_cache_lookups_total{kind="tag",result="hit"} 3.0' in metrics


async def test_where_tags_can_move_through_proxyd_they_are_never_answered_from_memory(
    make_proxyd, start_fake
):
    proxyd = await tag_twice(make_proxyd, start_fake, "allow_push = true")
    assert await tag_once_more(proxyd) == (200, "hit")  # from the small cache
    assert fast(proxyd).answered == 0


async def test_a_tag_answer_is_remembered_for_a_second_at_most(make_proxyd, start_fake):
    clock = FakeClock()
    proxyd = await tag_twice(make_proxyd, start_fake, clock=clock)
    clock.advance(1.1)
    assert await tag_once_more(proxyd) == (200, "hit")  # asked the small cache
    assert fast(proxyd).answered == 0


async def test_a_hot_answer_never_overtakes_a_request_aiohttp_took_first(served):
    """Thousands of races on one connection: a request for aiohttp, then a remembered
    hit microseconds later, landing at every point of the first one's handling."""
    proxyd, _, path = served
    racer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.racer",
        str(proxyd.server.port),
        "/v2/",
        path,
        "3000",
        "300",
        stdout=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    out, _ = await asyncio.wait_for(racer.communicate(), 60)
    assert json.loads(out) == {"tries": 3000, "out_of_order": 0, "wrong": 0}
