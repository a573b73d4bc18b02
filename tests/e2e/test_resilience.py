"""proxyd when things go wrong around it, with real peers: the registry goes away, fifty
clients want the same cold blob at once, proxyd itself is killed mid-download, and two
replicas share their tag state through a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.helpers import (
    REPOSITORY,
    StartProxyd,
    assert_same_image,
    upstream_config,
    wait_until_stored,
)
from tests.fakes import FakeImage, FakeRegistry, make_image
from tests.peers import LOOPBACK
from tests.peers.clients import Skopeo
from tests.peers.httpserver import ThreadedServer
from tests.peers.image import OCI_MANIFEST, BuiltImage, PushedImage, push_image
from tests.peers.proxyd import Namespace, proxyd_config
from tests.peers.redisserver import RedisServer
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers

ACCEPT_OCI = {"Accept": OCI_MANIFEST}


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(
    registry_host: str, registry_url: str, *, tag_ttl: float | None = None, **settings: Any
) -> str:
    """proxyd with one namespace, the registry itself, and no credentials."""
    return proxyd_config(
        default_namespace=registry_host,
        namespaces=[Namespace(registry_host, registry_url, tag_ttl=tag_ttl)],
        settings={"log_level": "info", **settings},
    )


def manifest_requests(registry: Registry) -> int:
    registry.log_barrier()
    return sum("/manifests/" in r.path for r in registry.requests())


def assert_store_verified(cache_dir: Path) -> None:
    """Every file under blobs/<alg>/<hex> hashes to its name."""
    for path in (cache_dir / "blobs").glob("*/*"):
        actual = hashlib.new(path.parent.name, path.read_bytes()).hexdigest()
        assert actual == path.name, f"{path} holds content of {path.parent.name}:{actual}"


# -- 1. the registry goes away: a tag is served stale ------------------------------------


def test_a_tag_is_served_stale_by_tag_while_the_registry_is_down(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    registry_factory: Callable[..., Registry],
    image: BuiltImage,
) -> None:
    registry = registry_factory("plain")
    pushed = push_image(skopeo, image, registry.host, REPOSITORY)
    proxyd = start_proxyd(config_for(registry.host, registry.url, tag_ttl=0))
    tag_path = f"/v2/{REPOSITORY}/manifests/{pushed.tag}"

    assert_same_image(skopeo.pull_to_dir(f"{proxyd.host}/{pushed.path}"), pushed)
    warm = proxyd.request("GET", tag_path, headers=ACCEPT_OCI)  # this Accept set, cached too
    assert warm.status == 200, warm.body[:500]
    logged = proxyd.wait_for_log(lambda log: bool(log) and log[-1].get("path") == tag_path)
    registry.stop()
    assert not registry.running

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{pushed.path}")

    assert_same_image(pulled, pushed)
    direct = proxyd.request("GET", tag_path, headers=ACCEPT_OCI)
    assert direct.status == 200, direct.body[:500]
    assert direct.header("X-Proxyd-Cache") == "stale"
    assert direct.header("Docker-Content-Digest") == pushed.manifest_digest
    assert sha256_of(direct.body) == pushed.manifest_digest
    log = proxyd.wait_for_log(lambda log: log[-1].get("path") == tag_path)[len(logged) :]
    by_tag = [e for e in log if e.get("path") == tag_path]
    assert len(by_tag) >= 2, proxyd.describe_log()  # skopeo's, and the direct request
    assert {(e.get("status"), e.get("cache")) for e in by_tag} == {(200, "stale")}, (
        proxyd.describe_log()
    )


# -- 2. fifty clients, one cold blob: one upstream GET -----------------------------------

CLIENTS = 50
BIG_BLOB = 64 * 1024 * 1024


async def _fetch_concurrently(url: str, clients: int) -> list[tuple[int, str, int]]:
    """`clients` simultaneous GETs of `url`: (status, sha256 of the body, length) each."""
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=clients, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[int, str, int]:
            async with session.get(url) as response:
                digest, length = hashlib.sha256(), 0
                async for chunk in response.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    length += len(chunk)
                return response.status, "sha256:" + digest.hexdigest(), length

        return await asyncio.gather(*(one() for _ in range(clients)))


def test_fifty_concurrent_gets_of_a_cold_blob_cost_the_registry_one_get(
    start_proxyd: StartProxyd, plain_registry: Registry
) -> None:
    digest = plain_registry.push_blob("team/big", os.urandom(BIG_BLOB))
    proxyd = start_proxyd(upstream_config(plain_registry, credentials=False))
    url = f"{proxyd.url}/v2/team/big/blobs/{digest}"

    results = asyncio.run(_fetch_concurrently(url, CLIENTS))

    assert results == [(200, digest, BIG_BLOB)] * CLIENTS
    plain_registry.log_barrier()
    served = [r for r in plain_registry.requests() if r.path.endswith(f"/blobs/{digest}")]
    assert [(r.method, r.status) for r in served] == [("GET", 200)], served


# -- 3. proxyd killed mid-download: nothing unverified survives --------------------------

SLOW_BLOB = 8 * 1024 * 1024


@pytest.fixture
def slow_registry() -> Iterator[tuple[FakeRegistry, FakeImage, ThreadedServer]]:
    """A registry that drips blobs at 1 MiB/s (64 KiB every 1/16 s): 8 s for the layer."""
    fake = FakeRegistry(drip=(64 * 1024, 1 / 16))
    image = fake.add(make_image(layer=os.urandom(SLOW_BLOB)))
    with ThreadedServer(fake.app(), name="slow-registry") as server:
        yield fake, image, server


def test_sigkill_mid_download_leaves_no_unverified_blob_and_the_restart_fetches_it(
    start_proxyd: StartProxyd,
    slow_registry: tuple[FakeRegistry, FakeImage, ThreadedServer],
    tmp_path: Path,
) -> None:
    fake, image, server = slow_registry
    blob = image.blobs[image.layer]
    stored = tmp_path / "cache" / "blobs" / "sha256" / image.layer.removeprefix("sha256:")
    config = config_for(f"{LOOPBACK}:{server.port}", server.url)
    cache = tmp_path / "cache"
    blob_path = f"/v2/{image.repository}/blobs/{image.layer}"

    first = start_proxyd(config, cache_dir=cache)
    connection = http.client.HTTPConnection(LOOPBACK, first.port, timeout=10)
    try:
        connection.request("GET", blob_path)
        response = connection.getresponse()
        assert response.status == 200
        head = response.read(256 * 1024)  # returns once these bytes went through proxyd
        assert head == blob[: len(head)]
        first.kill()
    finally:
        connection.close()

    assert not stored.exists(), "a blob was stored before it was complete"
    assert list((cache / "tmp").iterdir()), "the kill did not interrupt a download"
    assert_store_verified(cache)

    fake.drip = None  # the upstream is fast again
    second = start_proxyd(config, cache_dir=cache)
    assert list((cache / "tmp").iterdir()) == [], "the restart kept a partial download"

    answer = second.request("GET", blob_path)

    assert answer.status == 200
    assert sha256_of(answer.body) == image.layer
    assert wait_until_stored(cache, image.layer) == stored
    assert_store_verified(cache)
    assert [s.method for s in fake.requests(f"/blobs/{image.layer}")] == ["GET", "GET"]


def test_sigterm_mid_download_exits_cleanly_and_leaves_no_partial_file(
    start_proxyd: StartProxyd,
    slow_registry: tuple[FakeRegistry, FakeImage, ThreadedServer],
    tmp_path: Path,
) -> None:
    _fake, image, server = slow_registry
    cache = tmp_path / "cache"
    proxyd = start_proxyd(config_for(f"{LOOPBACK}:{server.port}", server.url), cache_dir=cache)
    connection = http.client.HTTPConnection(LOOPBACK, proxyd.port, timeout=10)
    try:
        connection.request("GET", f"/v2/{image.repository}/blobs/{image.layer}")
        response = connection.getresponse()
        assert response.status == 200
        response.read(256 * 1024)
        assert list((cache / "tmp").iterdir()), "no download was in progress"
        assert proxyd.stop(grace=15) == 0, proxyd.stderr_text()[-3000:]
    finally:
        connection.close()

    assert list((cache / "tmp").iterdir()) == [], "a partial download was left behind"
    assert_store_verified(cache)


# -- 4. two replicas, one redis: a tag resolved by one is known to the other -------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def test_two_proxyds_share_tag_resolutions_through_redis(
    start_proxyd: StartProxyd,
    plain_registry: Registry,
    plain_image: PushedImage,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    config = config_for(
        plain_registry.host,
        plain_registry.url,
        tag_ttl=3600,
        cache={"backend": "redis", "redis_url": redis_server.url},
    )
    first = start_proxyd(config, cache_dir=tmp_path / "cache-first")
    second = start_proxyd(config, cache_dir=tmp_path / "cache-second")
    tag_path = f"/v2/{plain_image.repository}/manifests/{plain_image.tag}"
    before_first = manifest_requests(plain_registry)

    resolved = first.request("GET", tag_path, headers=ACCEPT_OCI)

    assert resolved.status == 200, resolved.body[:500]
    assert resolved.header("X-Proxyd-Cache") == "miss"
    assert resolved.header("Docker-Content-Digest") == plain_image.manifest_digest
    before_second = manifest_requests(plain_registry)
    assert before_second > before_first, "the first proxyd did not ask the registry"
    assert redis_server.command("DBSIZE") != ":0", "nothing was stored in redis"

    head = second.request("HEAD", tag_path, headers=ACCEPT_OCI)
    get = second.request("GET", tag_path, headers=ACCEPT_OCI)

    for answer in (head, get):
        assert answer.status == 200, answer.body[:500]
        assert answer.header("Docker-Content-Digest") == plain_image.manifest_digest
        assert answer.header("X-Proxyd-Cache") == "hit"
    assert sha256_of(get.body) == plain_image.manifest_digest
    assert manifest_requests(plain_registry) == before_second, (
        "the second proxyd asked the registry for the manifest"
    )
