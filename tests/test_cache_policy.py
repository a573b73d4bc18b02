"""Tags, tag lists and their freshness: served from the small-response cache while
fresh, revalidated with a HEAD when old, and served stale when every host fails.

The policy is one, whichever storage holds the answers: `TestTheSmallResponsePolicy`
runs against each backend (a SQLite file, and a real redis-server), as
aiohttp-client-cache tests every backend with one test class."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from proxyd.reference import Digest
from proxyd.server.keys import PULLER, RESOLVER
from proxyd.smallcache import SmallCache
from tests.conftest import FakeClock, host, oci_code, origin, until, until_stored
from tests.fakes import FakeRegistry, make_image
from tests.peers.redisserver import RedisServer


def config(server: object, tag_ttl: float, *extra: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            *extra,
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            f"tag_ttl = {tag_ttl}",
        ]
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> list[str]:
    """The `[cache]` table of each backend (none: the SQLite file in the cache dir);
    the Redis database starts empty for every test."""
    if request.param == "sqlite":
        return []
    server: RedisServer = request.getfixturevalue("redis_server")
    assert server.command("FLUSHDB") == "+OK"
    return ["[cache]", 'backend = "redis"', f'redis_url = "{server.url}"']


def manifest_requests(upstream: FakeRegistry) -> list[str]:
    return [s.method for s in upstream.requests("/manifests/v1")]


def count_reads(proxyd) -> list[str]:
    """The keys of the small-cache reads from now on."""
    small = proxyd.server.app[RESOLVER].small
    keys: list[str] = []
    read = small.get

    async def counting(key: str) -> object:
        keys.append(key)
        return await read(key)

    small.get = counting
    return keys


class TestTheSmallResponsePolicy:
    """Each test runs on the SQLite file and on a real redis-server."""

    async def test_a_fresh_tag_is_answered_without_asking_upstream(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        image = upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 300, *backend))
        first = await proxyd.get("/v2/team/app/manifests/v1")
        assert first.headers["X-Proxyd-Cache"] == "miss"
        for method in ("GET", "HEAD", "GET"):
            again = await proxyd.request(method, "/v2/team/app/manifests/v1")
            assert again.status == 200
            assert again.headers["Docker-Content-Digest"] == image.digest
            assert again.headers["X-Proxyd-Cache"] == "hit"
        assert await again.read() == image.manifest
        assert manifest_requests(upstream) == ["GET"]

    async def test_an_old_tag_is_revalidated_with_a_head_and_no_body(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        image = upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        await proxyd.get("/v2/team/app/manifests/v1")
        again = await proxyd.get("/v2/team/app/manifests/v1")
        assert again.headers["X-Proxyd-Cache"] == "revalidated"
        assert await again.read() == image.manifest
        assert manifest_requests(upstream) == ["GET", "HEAD"]

    async def test_a_moved_tag_is_fetched_again(self, backend, make_proxyd, start_fake):
        upstream = FakeRegistry()
        old = upstream.add(make_image(layer=b"old" * 100))
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        assert (await proxyd.get("/v2/team/app/manifests/v1")).headers[
            "Docker-Content-Digest"
        ] == old.digest
        upstream.images.clear()
        new = upstream.add(make_image(layer=b"new" * 100))
        moved = await proxyd.get("/v2/team/app/manifests/v1")
        assert moved.headers["Docker-Content-Digest"] == new.digest
        assert await moved.read() == new.manifest
        assert manifest_requests(upstream) == ["GET", "HEAD", "GET"]

    async def test_when_every_host_fails_an_old_tag_is_served_stale(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        image = upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        await proxyd.get("/v2/team/app/manifests/v1")
        for failure in ({"status": 503}, {"status": 429}, {"status": 500}):
            upstream.status = failure["status"]
            stale = await proxyd.get("/v2/team/app/manifests/v1")
            assert stale.status == 200, failure
            assert stale.headers["X-Proxyd-Cache"] == "stale"
            assert await stale.read() == image.manifest

    async def test_without_a_cached_tag_the_client_gets_the_upstream_error(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry(status=503)
        upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        response = await proxyd.get("/v2/team/app/manifests/v1")
        assert response.status == 502

    async def test_a_deleted_tag_is_not_served_stale(self, backend, make_proxyd, start_fake):
        upstream = FakeRegistry()
        upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        await proxyd.get("/v2/team/app/manifests/v1")
        upstream.images.clear()
        response = await proxyd.get("/v2/team/app/manifests/v1")
        assert response.status == 404
        assert await oci_code(response) == "MANIFEST_UNKNOWN"

    async def test_offline_serves_the_cache_alone(
        self, backend, make_proxyd, start_fake, cache_dir
    ):
        upstream = FakeRegistry()
        image = upstream.add(make_image())
        server = await start_fake(upstream)
        online = await make_proxyd(config(server, 0, *backend))
        await online.get("/v2/team/app/manifests/v1")
        await (await online.get(f"/v2/team/app/blobs/{image.layer}")).read()
        # Stored before the next proxyd opens the cache: opening it clears tmp/.
        await until_stored(cache_dir, image.layer)
        seen = len(upstream.seen)

        offline = await make_proxyd(config(server, 0, *backend), offline=True)
        tag = await offline.get("/v2/team/app/manifests/v1")
        assert tag.status == 200
        assert tag.headers["X-Proxyd-Cache"] == "stale"
        blob = await offline.get(f"/v2/team/app/blobs/{image.layer}")
        assert await blob.read() == image.blobs[image.layer]
        missing = await offline.get("/v2/team/app/manifests/v2")
        assert missing.status == 503
        assert await oci_code(missing) == "UNAVAILABLE"
        assert len(upstream.seen) == seen

    async def test_concurrent_revalidations_of_one_tag_make_one_upstream_request(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        await proxyd.get("/v2/team/app/manifests/v1")
        answers = await asyncio.gather(
            *(proxyd.get("/v2/team/app/manifests/v1") for _ in range(20))
        )
        assert {a.status for a in answers} == {200}
        assert manifest_requests(upstream).count("HEAD") < 20
        assert manifest_requests(upstream).count("GET") == 1

    async def test_tag_lists_are_cached_and_served_stale(self, backend, make_proxyd, start_fake):
        upstream = FakeRegistry()
        upstream.add(make_image(tag="v1"))
        proxyd = await make_proxyd(config(await start_fake(upstream), 0, *backend))
        first = await proxyd.get("/v2/team/app/tags/list")
        assert (await first.json())["tags"] == ["v1"]
        upstream.status = 503
        stale = await proxyd.get("/v2/team/app/tags/list")
        assert stale.status == 200
        assert stale.headers["X-Proxyd-Cache"] == "stale"
        assert (await stale.json())["tags"] == ["v1"]

    async def test_a_tag_answer_does_not_serve_a_client_whose_accept_does_not_admit_its_type(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        upstream.add(make_image())
        proxyd = await make_proxyd(config(await start_fake(upstream), 300, *backend))
        oci = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        docker = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        await proxyd.get("/v2/team/app/manifests/v1", headers=oci)
        await proxyd.get("/v2/team/app/manifests/v1", headers=docker)
        await proxyd.get("/v2/team/app/manifests/v1", headers=oci)
        assert manifest_requests(upstream) == ["GET", "GET"]

    async def test_a_fresh_tag_is_answered_from_memory_where_no_push_can_move_it(
        self, backend, make_proxyd, start_fake
    ):
        """Where tags can move through proxyd, every answer is checked against the
        mark a write through proxyd leaves, which another replica may have left (two
        reads); elsewhere only the TTL ends an answer, and this process remembers it
        (no read at all)."""
        upstream = FakeRegistry()
        image = upstream.add(make_image())
        server = await start_fake(upstream)
        for extra, reads in (([], 0), (["allow_push = true"], 2)):
            proxyd = await make_proxyd(config(server, 300, *backend) + "\n" + "\n".join(extra))
            await proxyd.get("/v2/team/app/manifests/v1")
            keys = count_reads(proxyd)
            again = await proxyd.get("/v2/team/app/manifests/v1")
            assert again.headers["X-Proxyd-Cache"] == "hit"
            assert again.headers["Docker-Content-Digest"] == image.digest
            assert await again.read() == image.manifest
            assert len(keys) == reads, (extra, keys)

    async def test_a_remembered_tag_is_asked_for_again_after_a_second(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        upstream.add(make_image())
        clock = FakeClock()
        server = await start_fake(upstream)
        proxyd = await make_proxyd(config(server, 300, *backend), clock=clock)
        await proxyd.get("/v2/team/app/manifests/v1")
        keys = count_reads(proxyd)
        clock.advance(0.9)
        assert (await proxyd.get("/v2/team/app/manifests/v1")).headers["X-Proxyd-Cache"] == "hit"
        assert keys == []
        clock.advance(0.2)
        assert (await proxyd.get("/v2/team/app/manifests/v1")).headers["X-Proxyd-Cache"] == "hit"
        assert len(keys) == 1  # the small cache again, still fresh there
        assert manifest_requests(upstream) == ["GET"]

    async def test_a_remembered_tag_never_outlives_its_ttl(self, backend, make_proxyd, start_fake):
        upstream = FakeRegistry()
        upstream.add(make_image())
        clock = FakeClock()
        server = await start_fake(upstream)
        proxyd = await make_proxyd(config(server, 0.2, *backend), clock=clock)
        await proxyd.get("/v2/team/app/manifests/v1")
        clock.advance(0.3)
        again = await proxyd.get("/v2/team/app/manifests/v1")
        assert again.headers["X-Proxyd-Cache"] == "revalidated"
        assert manifest_requests(upstream) == ["GET", "HEAD"]

    async def test_a_removal_from_the_store_drops_remembered_tags(
        self, backend, make_proxyd, start_fake
    ):
        upstream = FakeRegistry()
        image = upstream.add(make_image())
        server = await start_fake(upstream)
        proxyd = await make_proxyd(config(server, 300, *backend))
        await proxyd.get("/v2/team/app/manifests/v1")
        keys = count_reads(proxyd)
        store = proxyd.server.app[PULLER].store
        store.unlink(host(server), "team/app", Digest.parse(image.digest), "_manifests")
        again = await proxyd.get("/v2/team/app/manifests/v1")
        assert again.headers["X-Proxyd-Cache"] == "hit"  # from the small cache, linked again
        assert len(keys) == 1
        # the link follows the manifest's file, after the answer
        await until(
            lambda: (
                store.linked(host(server), "team/app", Digest.parse(image.digest), "_manifests")
                is not None
            )
        )
        assert store.linked(host(server), "team/app", Digest.parse(image.digest), "_manifests")


async def test_the_sqlite_cache_keeps_a_write_ahead_log(make_proxyd, start_fake, cache_dir):
    """Storing a tag answer costs no fsync (one per commit in SQLite's default mode);
    a power cut may lose the newest records, never leave a corrupt file."""
    upstream = FakeRegistry()
    upstream.add(make_image())
    proxyd = await make_proxyd(config(await start_fake(upstream), tag_ttl=300))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    with contextlib.closing(sqlite3.connect(cache_dir / "small.sqlite")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_cache_that_cannot_set_its_pragmas_still_serves(tmp_path):
    small = SmallCache.sqlite(tmp_path / "small.sqlite", pragmas=("PRAGMA no_such_thing = (",))
    with capture_logs() as events:
        await small.open()
    assert [e["event"] for e in events] == ["smallcache.open_failed"]
    await small.put("k", {"v": 1})
    entry = await small.get("k")
    assert entry is not None and entry.value == {"v": 1}
    await small.close()


async def test_a_cache_file_of_an_earlier_proxyd_reads_the_same(tmp_path):
    """The layout aiohttp-client-cache's SQLiteCache wrote (proxyd.smallstorage): a
    record stored by a proxyd that used it is found, and a foreign one is pruned."""
    path = tmp_path / "small.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE IF NOT EXISTS `small_responses` (key PRIMARY KEY, value)")
        record = b'{"value":{"v":1},"stored_at":1000.0}'
        db.execute("INSERT INTO `small_responses` (key,value) VALUES (?,?)", ("k", record))
        db.execute("INSERT INTO `small_responses` (key,value) VALUES (?,?)", ("x", b"\x80pickle"))
        db.commit()
    small = SmallCache.sqlite(path, clock=lambda: 2000.0)
    await small.open()
    entry = await small.get("k")
    assert entry is not None and (entry.value, entry.stored_at) == ({"v": 1}, 1000.0)
    assert await small.get("x") is None  # not proxyd's JSON: a miss, no error
    assert await small.prune(older_than=500.0) == 1
    assert await small.get("k") is not None
    await small.close()
