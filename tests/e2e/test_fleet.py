"""A fleet of real proxyd processes sharing a real redis-server, in front of a real
distribution: what exists of issue 18 so far (upload sessions in Redis, the peer
endpoint), seen from outside as a user would run it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.helpers import assert_same_image, upstream_config
from tests.peers import LOOPBACK, free_port, http_request
from tests.peers.clients import Skopeo
from tests.peers.image import BuiltImage, PushedImage
from tests.peers.proxyd import ProxydProcess
from tests.peers.redisserver import RedisServer
from tests.peers.registry import Registry
from tests.peers.roundrobin import RoundRobin

pytestmark = pytest.mark.peers

SECRET = "a-fleet-secret-for-the-e2e-tests"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def fleet(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[[Registry, int], list[ProxydProcess]]]:
    """``fleet(registry, n)``: n proxyd nodes in front of ``registry`` (pushes allowed),
    each with its own port and cache, all in one fleet; stopped after the test."""
    started: list[ProxydProcess] = []
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET + "\n")

    def start(registry: Registry, count: int) -> list[ProxydProcess]:
        cluster = {"redis_url": redis_server.url, "secret_file": str(secret)}
        config = upstream_config(
            registry,
            credentials=False,
            settings={"allow_push": [registry.host], "cluster": cluster},
        )
        nodes = [
            ProxydProcess(config, tmp_path / f"node-{len(started) + n}", advertise=True)
            for n in range(count)
        ]
        for node in nodes:
            started.append(node)
            node.start()
        return nodes

    yield start
    for node in started:
        code = node.stop()
        print(f"--- {node.workdir.name} (exit {code}) access log ---")
        print(node.describe_log(last=60))


def test_a_push_through_three_replicas_behind_one_address_lands_intact_and_pulls_back(
    fleet: Callable[[Registry, int], list[ProxydProcess]],
    registry_factory: Callable[..., Registry],
    redis_server: RedisServer,
    skopeo: Skopeo,
    image: BuiltImage,
) -> None:
    registry = registry_factory("plain")  # a registry of its own: nothing to mount from
    replicas = fleet(registry, 3)
    with RoundRobin([node.url for node in replicas]) as service:
        pushed = PushedImage(image, service.host, "fleet/pushed", "v1")

        skopeo.push(image.source, pushed.ref)

        # Each upload's requests went to different replicas, in turn.
        uploads = [(i, m) for i, m, path in service.served() if "/blobs/uploads/" in path]
        assert {m for _, m in uploads} >= {"POST", "PATCH", "PUT"}, service.served()
        assert {i for i, _ in uploads} == {0, 1, 2}
        straight = skopeo.pull_to_dir(f"{registry.host}/{pushed.path}")
        assert_same_image(straight, pushed)
        back = skopeo.pull_to_dir(pushed.ref)
        assert_same_image(back, pushed)
    assert redis_server.command("ZCARD", "proxyd:uploads:idle") == ":0"  # all finished


def test_a_node_streams_what_it_holds_to_a_peer_with_the_secret_only(
    fleet: Callable[[Registry, int], list[ProxydProcess]],
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
) -> None:
    registry = registry_factory("plain")
    pushed = PushedImage(image, registry.host, "fleet/held", "v1")
    skopeo.push(image.source, pushed.ref)
    (node,) = fleet(registry, 1)
    assert_same_image(skopeo.pull_to_dir(f"{node.host}/{pushed.path}"), pushed)
    layer = image.layer_digests[0]
    path = f"/_proxyd/peers/blobs/{layer}"

    refused = http_request("GET", node.url + path)
    wrong = http_request("GET", node.url + path, headers={"Authorization": "Bearer guess"})
    given = http_request("GET", node.url + path, headers={"Authorization": f"Bearer {SECRET}"})

    assert (refused.status, wrong.status) == (401, 401)
    assert given.status == 200
    assert given.body == image.blob(layer)
    assert SECRET not in node.stderr_text()


def test_a_peer_listener_of_its_own_serves_the_peer_endpoint_and_nothing_else(
    tmp_path: Path,
    redis_server: RedisServer,
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    image: BuiltImage,
) -> None:
    """`[cluster] listen`: the registry API stays on `listen` (the loopback in a
    DaemonSet), the peers reach the blobs on the node's address."""
    registry = registry_factory("plain")
    pushed = PushedImage(image, registry.host, "fleet/listener", "v1")
    skopeo.push(image.source, pushed.ref)
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)
    peers_at = f"{LOOPBACK}:{free_port()}"
    cluster = {
        "redis_url": redis_server.url,
        "secret_file": str(secret),
        "listen": peers_at,
        "advertise": f"http://{peers_at}",
    }
    config = upstream_config(registry, credentials=False, settings={"cluster": cluster})
    with ProxydProcess(config, tmp_path / "node") as node:
        assert_same_image(skopeo.pull_to_dir(f"{node.host}/{pushed.path}"), pushed)
        path = f"/_proxyd/peers/blobs/{image.layer_digests[0]}"
        with_secret = {"Authorization": f"Bearer {SECRET}"}

        peer = http_request("GET", f"http://{peers_at}{path}", headers=with_secret)
        api = http_request("GET", f"http://{peers_at}/v2/")
        health = http_request("GET", f"http://{peers_at}/healthz")
        main = http_request("GET", node.url + path, headers=with_secret)

        assert peer.status == 200
        assert peer.body == image.blob(image.layer_digests[0])
        assert (api.status, health.status) == (404, 200)
        assert main.status == 404  # the peer endpoint lives on its own listener only
        assert node.wait_for_event("listening for peers")[0]["address"] == peers_at
