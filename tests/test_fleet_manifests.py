"""Manifests by digest through the fleet (proxyd.fleetmanifests): a node that lacks one
asks the upstream for a `HEAD` (the repository's confirmation, its media type and
size; Docker Hub counts no HEAD against the pull limit) and takes the body from a
node that holds it; wrong bytes from a peer, or no holder, or Redis unreachable,
leave it to `GET` through the chain as today, and a repository the upstream says
lacks the manifest is a 404 whoever holds it. Nodes are real proxyd apps sharing a
real redis-server (the `fleet` fixture of tests/test_fleet_pulls.py); the fake peers
answer as `proxyd.server.peers` does."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxyd.manifests import OCI_MANIFEST
from tests.conftest import origin, until
from tests.fakes import FakeRegistry
from tests.peers.proxyd import CLOSED_PORT_URL
from tests.peers.redisserver import RedisServer
from tests.test_fleet_pulls import fake_peer, fleet, metric, redis_server, register

__all__ = ["fleet", "redis_server"]  # the fixtures, shared with tests/test_fleet_pulls.py


def manifest_requests(upstream: FakeRegistry, digest: str, method: str) -> int:
    return sum(1 for s in upstream.requests(f"manifests/{digest}") if s.method == method)


async def get_manifest(node: Any, digest: str, repository: str = "team/app") -> bytes:
    response = await node.get(
        f"/v2/{repository}/manifests/{digest}", headers={"Accept": OCI_MANIFEST}
    )
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert response.headers["Docker-Content-Digest"] == digest
    body: bytes = await response.read()
    return body


def held_by(redis: RedisServer, digest: str, url: str) -> bool:
    return redis.command("HEXISTS", f"proxyd:fleet:blob:{digest}:held", url) == ":1"


async def test_a_manifest_by_digest_costs_the_fleet_one_get_and_the_others_a_head(
    fleet, redis_server
):
    a, b = await fleet.node(), await fleet.node()
    image = fleet.image
    assert await get_manifest(a, image.digest) == image.manifest
    # Stored behind the answer, then announced as a blob is.
    await until(lambda: held_by(redis_server, image.digest, a.url))

    assert await get_manifest(b, image.digest) == image.manifest
    assert manifest_requests(fleet.upstream, image.digest, "GET") == 1  # a's alone
    assert manifest_requests(fleet.upstream, image.digest, "HEAD") == 1  # b's
    assert metric(b, "upstream_saved_bytes") == len(image.manifest)
    # b stored it too: a third node may take it from either.
    await until(lambda: held_by(redis_server, image.digest, b.url))


async def test_a_peer_sending_wrong_bytes_leaves_the_node_to_get_it_upstream(
    fleet, redis_server, aiohttp_server
):
    image = fleet.image
    wrong = image.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion": 3')
    assert len(wrong) == len(image.manifest) and wrong != image.manifest

    async def lie(request: web.Request) -> web.StreamResponse:
        return web.Response(body=wrong, content_type="application/octet-stream")

    peer = await fake_peer(aiohttp_server, lie)
    register(redis_server, image.digest, peer)
    b = await fleet.node()
    assert await get_manifest(b, image.digest) == image.manifest
    assert manifest_requests(fleet.upstream, image.digest, "HEAD") == 1
    assert manifest_requests(fleet.upstream, image.digest, "GET") == 1
    assert metric(b, "peer_failures", "digest") == 1
    assert metric(b, "upstream_saved_bytes") == 0


async def test_a_repository_the_upstream_says_lacks_it_is_a_404_though_a_peer_holds_it(
    fleet, redis_server, aiohttp_server
):
    image = fleet.image
    asked = []

    async def hold(request: web.Request) -> web.StreamResponse:
        asked.append(request.path)
        return web.Response(body=image.manifest, content_type="application/octet-stream")

    register(redis_server, image.digest, await fake_peer(aiohttp_server, hold))
    b = await fleet.node()
    response = await b.get(f"/v2/team/other/manifests/{image.digest}")
    assert response.status == 404
    assert (await response.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert asked == []  # the peer's bytes were never wanted
    assert manifest_requests(fleet.upstream, image.digest, "GET") == 0


async def test_the_head_is_asked_of_the_repositorys_confirmers_never_a_pull_only_mirror(
    fleet, redis_server, start_fake
):
    a = await fleet.node()
    image = fleet.image
    assert await get_manifest(a, image.digest) == image.manifest
    await until(lambda: held_by(redis_server, image.digest, a.url))

    mirror = FakeRegistry()  # holds nothing: its word would count for nothing anyway
    mirror_url = origin(await start_fake(mirror))
    table = f'[namespaces."{fleet.upstream_host}".host."{mirror_url}"]'
    b = await fleet.node(chain=(table, 'capabilities = ["pull"]'))
    assert await get_manifest(b, image.digest) == image.manifest
    assert manifest_requests(mirror, image.digest, "HEAD") == 0
    assert manifest_requests(fleet.upstream, image.digest, "HEAD") == 1
    assert manifest_requests(fleet.upstream, image.digest, "GET") == 1  # a's alone


async def test_a_registry_refusing_head_answers_the_get_it_is_asked_again_as(
    fleet, redis_server, aiohttp_server
):
    image = fleet.image
    fleet.upstream.no_manifest_head = True
    register(redis_server, image.digest, CLOSED_PORT_URL)
    b = await fleet.node()
    assert await get_manifest(b, image.digest) == image.manifest
    assert manifest_requests(fleet.upstream, image.digest, "GET") == 1  # one, not two


async def test_with_redis_unreachable_a_node_gets_the_manifest_as_today(fleet):
    closed = CLOSED_PORT_URL.replace("http", "redis")
    a, b = await fleet.node(redis_url=closed), await fleet.node(redis_url=closed)
    image = fleet.image
    assert await get_manifest(a, image.digest) == image.manifest
    assert await get_manifest(b, image.digest) == image.manifest
    assert manifest_requests(fleet.upstream, image.digest, "GET") == 2
    assert manifest_requests(fleet.upstream, image.digest, "HEAD") == 0
