"""Upload sessions in Redis (proxyd.fleetuploads): replicas behind one address, each a
real proxyd app on 127.0.0.1 with its own cache, sharing a real redis-server, take
the requests of one upload in any order and the registry gets one intact blob. The
registry here signs its upload state into every location (as distribution does), so
a replica that continued from an old location would be refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxyd.server.keys import UPLOADER
from tests.conftest import FakeClock, until
from tests.fakes import digest_of
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.peers.redisserver import RedisServer
from tests.test_push import LAYER, UploadRegistry, errors, push_config, serve, start

SECRET = "the-fleets-secret-0123456789"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def replicas(make_proxyd, start_fake, redis_server, tmp_path):
    """`await replicas(n, **settings)`: n proxyds in front of one UploadRegistry
    (`.upstream`), pushes allowed, sharing the redis-server."""
    assert redis_server.command("FLUSHALL") == "+OK"
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)

    async def make(count: int, *, redis_url: str | None = None, top: str = "", **kw: Any):
        upstream = UploadRegistry()
        server = await serve(start_fake, upstream)
        cluster = [
            "[cluster]",
            f'redis_url = "{redis_url or redis_server.url}"',
            'advertise = "http://127.0.0.1:5999"',
            f'secret_file = "{secret}"',
            "timeout = 0.5",
        ]
        made = []
        for n in range(count):
            config = top + push_config(server, *cluster)
            made.append(await make_proxyd(config, cache_dir=tmp_path / f"cache-{n}", **kw))
        return upstream, made

    return make


def tmp_files(proxyd: Any) -> list[Path]:
    cache = Path(proxyd.server.app[UPLOADER].store.root)
    return list((cache / "tmp").iterdir())


async def test_an_upload_goes_on_whichever_replica_takes_each_request(replicas):
    upstream, (a, b, c) = await replicas(3)
    started = await start(a)
    assert started.status == 202
    location = started.headers["Location"]
    chunks = [LAYER[:40000], LAYER[40000:80000], LAYER[80000:]]

    offset = 0
    for proxyd, chunk in zip((b, c, a), chunks, strict=True):
        headers = {"Content-Range": f"{offset}-{offset + len(chunk) - 1}"}
        patched = await proxyd.patch(location, data=chunk, headers=headers)
        assert patched.status == 202, await patched.text()
        offset += len(chunk)
        assert patched.headers["Range"] == f"0-{offset - 1}"
        status = await (c if proxyd is not c else b).get(location)  # asked elsewhere
        assert status.headers["Range"] == f"0-{offset - 1}"
    done = await b.put(location, params={"digest": digest_of(LAYER)})

    assert done.status == 201, await done.text()
    assert upstream.blobs["team/app"][digest_of(LAYER)] == LAYER
    pulled = await c.get(f"/v2/team/app/blobs/{digest_of(LAYER)}")
    assert await pulled.read() == LAYER


async def test_a_replica_that_took_every_byte_keeps_the_blob_and_the_others_do_not(replicas):
    upstream, (a, b) = await replicas(2)
    whole = (await start(a)).headers["Location"]
    assert (await a.patch(whole, data=LAYER)).status == 202
    assert (await a.put(whole, params={"digest": digest_of(LAYER)})).status == 201
    other = LAYER[::-1]
    moved = (await start(a)).headers["Location"]
    assert (await b.patch(moved, data=other)).status == 202
    assert (await b.put(moved, params={"digest": digest_of(other)})).status == 201

    kept = await a.get(f"/v2/team/app/blobs/{digest_of(LAYER)}")
    assert kept.headers["X-Proxyd-Cache"] == "hit"
    assert await kept.read() == LAYER
    for proxyd in (a, b):  # neither had every byte of the other blob: fetched, then
        fetched = await proxyd.get(f"/v2/team/app/blobs/{digest_of(other)}")
        assert fetched.headers["X-Proxyd-Cache"] == "miss"
        assert await fetched.read() == other
    assert upstream.blobs["team/app"][digest_of(other)] == other


async def test_an_upload_belongs_to_its_repository_on_every_replica(replicas):
    upstream, (a, b) = await replicas(2)
    uuid = (await start(a)).headers["Docker-Upload-UUID"]

    elsewhere = await b.patch(f"/v2/team/other/blobs/uploads/{uuid}", data=b"x")
    made_up = await b.patch("/v2/team/app/blobs/uploads/" + "a" * 32, data=b"x")

    assert elsewhere.status == made_up.status == 404
    assert errors(await elsewhere.json())[0] == "BLOB_UPLOAD_UNKNOWN"
    assert upstream.requests("PATCH") == []


async def test_a_cancel_on_one_replica_ends_the_upload_for_all(replicas):
    upstream, (a, b) = await replicas(2)
    location = (await start(a)).headers["Location"]
    assert (await a.patch(location, data=b"abc")).status == 202

    assert (await b.delete(location)).status == 204

    assert upstream.uploads == {}
    gone = await a.patch(location, data=b"def")
    assert gone.status == 404
    assert tmp_files(a) == []  # a's copy of the bytes went as it heard


async def test_an_idle_upload_is_cancelled_upstream_by_one_replica(replicas, redis_server):
    clock = FakeClock()
    upstream, replicas_ = await replicas(3, top="upload_ttl = 0.05\n", clock=clock)
    location = (await start(replicas_[0])).headers["Location"]
    assert (await replicas_[1].patch(location, data=b"abc")).status == 202

    clock.advance(1.0)  # idle for longer than the TTL, on every replica's clock

    await until(lambda: upstream.uploads == {})
    assert len(upstream.requests("DELETE")) == 1
    assert redis_server.command("ZCARD", "proxyd:uploads:idle") == ":0"
    gone = await replicas_[2].patch(location, data=b"def")
    assert gone.status == 404


async def test_with_redis_unreachable_a_replica_takes_uploads_alone(replicas):
    closed = CLOSED_PORT_URL.replace("http", "redis")
    upstream, (a,) = await replicas(1, redis_url=closed)

    location = (await start(a)).headers["Location"]
    assert (await a.patch(location, data=LAYER)).status == 202
    done = await a.put(location, params={"digest": digest_of(LAYER)})

    assert done.status == 201
    assert upstream.blobs["team/app"][digest_of(LAYER)] == LAYER
    kept = await a.get(f"/v2/team/app/blobs/{digest_of(LAYER)}")
    assert kept.headers["X-Proxyd-Cache"] == "hit"
