"""A fleet of real proxyd processes sharing a real redis-server, in front of a real
distribution, seen from outside as a user would run it: pulls through the fleet
(a cold blob fetched from the upstream once, whoever fails meanwhile: the fetching
node killed, a peer sending wrong bytes, Redis stopped), upload sessions in Redis,
the peer endpoint and its listener. For pulls the upstream sits behind a counting
relay (bench/relay.py), which says how many GETs of each blob it was asked."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.upstreams import RelayProcess
from tests.e2e.helpers import assert_same_image, upstream_config
from tests.peers import LOOPBACK, PeerError, free_port, http_request
from tests.peers.clients import Skopeo
from tests.peers.image import BuiltImage, PushedImage, build_image
from tests.peers.proxyd import Namespace, ProxydProcess, proxyd_config
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


def peer_listener(tmp_path: Path, redis_server: RedisServer) -> tuple[str, dict[str, str]]:
    """A free address for `[cluster] listen`, and the `[cluster]` table of a node
    advertising it (the fleet's secret in a file of its own)."""
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)
    peers_at = f"{LOOPBACK}:{free_port()}"
    cluster = {
        "redis_url": redis_server.url,
        "secret_file": str(secret),
        "listen": peers_at,
        "advertise": f"http://{peers_at}",
    }
    return peers_at, cluster


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
    peers_at, cluster = peer_listener(tmp_path, redis_server)
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


def test_the_peer_listener_keeps_the_main_listeners_connection_bounds(
    tmp_path: Path, redis_server: RedisServer, registry_factory: Callable[..., Registry]
) -> None:
    """`max_connections` holds on the peer listener too (a cap of its own): it faces
    the node network, and must be no unbounded way in beside a bounded main listener."""
    registry = registry_factory("plain")
    peers_at, cluster = peer_listener(tmp_path, redis_server)
    settings = {"cluster": cluster, "max_connections": 1}
    config = upstream_config(registry, credentials=False, settings=settings)
    host, port = peers_at.rsplit(":", 1)
    with ProxydProcess(config, tmp_path / "node") as node:
        # the connection accepted first holds the listener's one place
        with socket.create_connection((host, int(port)), timeout=10):
            refused = http_request("GET", f"http://{peers_at}/healthz")
        main = http_request("GET", node.url + "/healthz")

    assert refused.status == 503
    assert main.status == 200  # the main listener's cap is its own


# -- pulls through the fleet ----------------------------------------------------------------

FLEET_REPO = "fleet/app"


@pytest.fixture(scope="module")
def fleet_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """Three layers of 2 MiB: small, but a few seconds each behind a slowed relay."""
    return build_image(tmp_path_factory.mktemp("fleet-image"), seed=18, layer_size=2 << 20)


class Upstream:
    """A distribution holding `fleet_image` as fleet/app:v1, behind a counting relay
    (`rate`: bytes a second per connection, 0: unpaced) that the nodes are pointed at."""

    def __init__(self, registry: Registry, relay: RelayProcess, image: BuiltImage) -> None:
        self.registry, self.relay, self.image = registry, relay, image
        self.host = f"127.0.0.1:{relay.port}"

    def blob_gets(self) -> dict[str, int]:
        return {d: self.relay.gets(f"/blobs/{d}") for d in self.image.blob_digests}


@pytest.fixture
def upstream(
    tmp_path: Path,
    registry_factory: Callable[..., Registry],
    skopeo: Skopeo,
    fleet_image: BuiltImage,
) -> Iterator[Callable[[float], Upstream]]:
    relays: list[RelayProcess] = []

    def make(rate: float = 0.0) -> Upstream:
        registry = registry_factory("plain")
        skopeo.push(fleet_image.source, f"{registry.host}/{FLEET_REPO}:v1")
        relay = RelayProcess(tmp_path / f"relay-{len(relays)}", registry.url, rate=rate)
        relays.append(relay)
        return Upstream(registry, relay, fleet_image)

    yield make
    for relay in relays:
        relay.stop()


@pytest.fixture
def nodes(
    tmp_path: Path, redis_server: RedisServer
) -> Iterator[Callable[[Upstream, int], list[ProxydProcess]]]:
    """`nodes(upstream, n)`: n fleet nodes pulling through the relay, started at once."""
    started: list[ProxydProcess] = []
    secret = tmp_path / "peer-secret"
    secret.write_text(SECRET)

    def start(up: Upstream, count: int) -> list[ProxydProcess]:
        cluster = {"redis_url": redis_server.url, "secret_file": str(secret), "ttl": 2.0}
        config = proxyd_config(
            default_namespace=up.host,
            namespaces=[Namespace(up.host, up.relay.url)],
            settings={"log_level": "info", "cluster": cluster},
        )
        made = [
            ProxydProcess(config, tmp_path / f"node-{len(started) + n}", advertise=True)
            for n in range(count)
        ]
        started.extend(made)
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(lambda node: node.start(timeout=45), made))
        return made

    yield start
    for node in started:
        code = node.stop()
        print(f"--- {node.workdir.name} (exit {code}) log ---")
        print(node.describe_log(last=30))


def pull(skopeo: Skopeo, node: ProxydProcess, *retries: str) -> Path:
    """skopeo copies fleet/app:v1 through `node` into a directory of the node's own."""
    dest = node.workdir / "pulled"
    dest.mkdir(exist_ok=True)
    ref = f"docker://{node.host}/{FLEET_REPO}:v1"
    skopeo.copy(ref, f"dir:{dest}", extra=list(retries), timeout=60)
    return dest


def assert_holds(node: ProxydProcess, image: BuiltImage, within: float = 10.0) -> None:
    """The node's store holds every blob of the image, each its digest's bytes."""
    deadline = time.monotonic() + within
    for digest in image.blob_digests:
        path = node.cache_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest


def assert_pulled(dest: Path, image: BuiltImage) -> None:
    for digest in image.blob_digests:
        blob = dest / digest.removeprefix("sha256:")
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == digest


def test_ten_nodes_pulling_one_cold_image_at_once_fetch_each_blob_from_upstream_once(
    upstream: Callable[[float], Upstream],
    nodes: Callable[[Upstream, int], list[ProxydProcess]],
    skopeo: Skopeo,
) -> None:
    up = upstream(4 << 20)  # 4 MiB/s: each layer half a second, long enough to share
    fleet_nodes = nodes(up, 10)

    with ThreadPoolExecutor(10) as pool:
        pulled = list(pool.map(lambda node: pull(skopeo, node), fleet_nodes))

    assert up.blob_gets() == dict.fromkeys(up.image.blob_digests, 1)
    for node, dest in zip(fleet_nodes, pulled, strict=True):
        assert_pulled(dest, up.image)
        assert_holds(node, up.image)


def test_the_fetching_node_killed_mid_blob_leaves_the_others_to_complete(
    upstream: Callable[[float], Upstream],
    nodes: Callable[[Upstream, int], list[ProxydProcess]],
    skopeo: Skopeo,
) -> None:
    up = upstream(1 << 20)  # 1 MiB/s: a layer takes two seconds
    first, *others = nodes(up, 4)
    with ThreadPoolExecutor(4) as pool:
        doomed = pool.submit(pull, skopeo, first)  # the fetching node's own client
        layer = up.image.layer_digests[0]
        deadline = time.monotonic() + 10
        while up.relay.gets(f"/blobs/{layer}") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        pulls = [pool.submit(pull, skopeo, node) for node in others]
        deadline = time.monotonic() + 20
        while streams_to_peers(first) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        first.kill()  # in the middle of the layer it streams to the others
        pulled = [p.result(timeout=60) for p in pulls]
        with pytest.raises(PeerError):  # its node died under it
            doomed.result(timeout=60)

    for node, dest in zip(others, pulled, strict=True):
        assert_pulled(dest, up.image)
        assert_holds(node, up.image)
    events = [e for node in others for e in node.logs() if e.get("peer") == first.url]
    assert any(e["event"] == "peer.failed" for e in events), "none was streaming from it"


def streams_to_peers(node: ProxydProcess) -> float:
    """`proxyd_peer_streams` of `node`: blobs it is streaming to peers now."""
    text = http_request("GET", node.url + "/metrics").body.decode()
    lines = [line for line in text.splitlines() if line.startswith("proxyd_peer_streams ")]
    return float(lines[0].split()[1]) if lines else 0.0


class WrongBytes:
    """A fleet node that sends every blob reversed: a node whose disk corrupted its
    store (the peer endpoint of proxyd.server.peers answering from the store: 200,
    `X-Proxyd-Cache: hit`, the blob's length, but not its bytes)."""

    def __init__(self, image: BuiltImage) -> None:
        blobs = {d: image.blob(d)[::-1] for d in image.blob_digests}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = blobs.get(self.path.rsplit("/", 1)[-1], b"")
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Proxyd-Cache", "hit")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WrongBytes:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def register(self, redis: RedisServer, digests: tuple[str, ...]) -> None:
        """In the directory as a live node holding every digest, as `Directory.holding`
        would put it."""
        boot = "0badc0de0badc0de"
        assert redis.command("SET", f"proxyd:fleet:node:{self.url}", boot) == "+OK"
        for digest in digests:
            base = f"proxyd:fleet:blob:{digest}:"
            redis.command("HSET", base + "held", self.url, boot)
            redis.command("HSET", base + "load", self.url, f"0 0 {boot}")
            redis.command("ZADD", base + "tree", "0", self.url)


def test_a_peer_sending_wrong_bytes_is_detected_and_skipped(
    upstream: Callable[[float], Upstream],
    nodes: Callable[[Upstream, int], list[ProxydProcess]],
    redis_server: RedisServer,
    skopeo: Skopeo,
) -> None:
    up = upstream(0)
    (node,) = nodes(up, 1)
    with WrongBytes(up.image) as liar:
        liar.register(redis_server, up.image.blob_digests)

        dest = pull(skopeo, node)  # its bytes withheld until verified: nobody is cut

    assert_pulled(dest, up.image)
    assert_holds(node, up.image)
    mismatches = [e for e in node.logs() if e.get("event") == "peer.digest_mismatch"]
    assert mismatches and {e["peer"] for e in mismatches} == {liar.url}
    assert up.blob_gets() == dict.fromkeys(up.image.blob_digests, 1)
    assert SECRET not in node.stderr_text()


def test_redis_stopped_in_the_middle_of_the_pulls_they_complete(
    upstream: Callable[[float], Upstream],
    nodes: Callable[[Upstream, int], list[ProxydProcess]],
    redis_server: RedisServer,
    skopeo: Skopeo,
) -> None:
    up = upstream(2 << 20)  # 2 MiB/s: a layer takes a second
    fleet_nodes = nodes(up, 4)
    with ThreadPoolExecutor(4) as pool:
        pulls = [pool.submit(pull, skopeo, node) for node in fleet_nodes]
        time.sleep(0.5)
        redis_server.stop()
        pulled = [p.result(timeout=60) for p in pulls]

    for node, dest in zip(fleet_nodes, pulled, strict=True):
        assert_pulled(dest, up.image)
        assert_holds(node, up.image)
        assert node.wait_for_event("fleet.redis_unavailable")  # logged once, then alone
