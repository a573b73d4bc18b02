"""One answer per tag for every engine: docker, containerd, podman, skopeo and
`proxyd prefetch` each send their own Accept, and one resolution of a tag serves
them all; only a client that cannot take the cached answer asks upstream, and its
answer is kept beside the first. The upstream negotiates as distribution 2.8 does
(tests/fakes.py, NegotiatingRegistry)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from proxyd.manifests import MANIFEST_TYPES
from proxyd.server.fastpath import FAST
from proxyd.server.keys import RESOLVER
from tests.conftest import FakeClock, host, oci_code, origin, until
from tests.fakes import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    NegotiatingRegistry,
    make_list,
)
from tests.peers.redisserver import RedisServer
from tests.test_fastpath import Connection, get

DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# The Accept lines each engine sends for a tag (as one line or several, as they do).
ENGINES: dict[str, list[str]] = {
    "docker": [DOCKER_MANIFEST, DOCKER_LIST, OCI_INDEX, OCI_MANIFEST, DOCKER_V1],
    "containerd": [f"{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"],
    "podman": [OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_V1, DOCKER_LIST, OCI_INDEX],
    "skopeo": [OCI_MANIFEST, DOCKER_MANIFEST, DOCKER_V1, DOCKER_LIST, OCI_INDEX],
    "prefetch": list(MANIFEST_TYPES),
}
SCHEMA2_ONLY = [DOCKER_MANIFEST]  # an old docker client: no lists


def config(server: object, tag_ttl: float = 300, *extra: str) -> str:
    return "\n".join(
        [
            f'default_namespace = "{host(server)}"',
            *extra,
            f'[namespaces."{host(server)}"]',
            f'server = "{origin(server)}"',
            f"tag_ttl = {tag_ttl}",
        ]
    )


def accept(lines: list[str]) -> list[tuple[str, str]]:
    return [("Accept", line) for line in lines]


def joined(proxyd) -> float:
    """Requests that joined an upstream request already in flight."""
    registry = proxyd.server.app[RESOLVER].metrics.registry
    return registry.get_sample_value("proxyd_coalesced_requests_total") or 0.0


async def pull_tag(proxyd, lines: list[str], method: str = "GET"):
    return await proxyd.request(method, "/v2/team/app/manifests/v1", headers=accept(lines))


async def test_one_resolution_of_a_tag_serves_every_engine(make_proxyd, start_fake):
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    caches = []
    for name, lines in ENGINES.items():
        response = await pull_tag(proxyd, lines)
        assert response.status == 200, name
        assert response.headers["Docker-Content-Digest"] == listed.digest, name
        assert response.headers["Content-Type"] == DOCKER_LIST, name
        assert await response.read() == listed.body, name
        caches.append(response.headers["X-Proxyd-Cache"])
    assert caches == ["miss", "hit", "hit", "hit", "hit"]
    assert [s.method for s in upstream.requests()] == ["GET"]


async def test_a_client_without_accept_or_with_wildcards_takes_the_cached_answer(
    make_proxyd, start_fake
):
    """No Accept admits anything (RFC 9110 §12.5.1), as do `*/*` and `application/*`."""
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    assert (await pull_tag(proxyd, ENGINES["skopeo"])).status == 200
    for lines in ([], ["*/*"], ["application/*"], [f"text/plain;q=0.5, {DOCKER_LIST}"]):
        response = await pull_tag(proxyd, lines)
        assert response.headers["Docker-Content-Digest"] == listed.digest, lines
        assert response.headers["X-Proxyd-Cache"] == "hit", lines
    assert len(upstream.requests()) == 1


async def test_a_client_that_cannot_take_the_cached_type_gets_its_own_answer_kept_beside(
    make_proxyd, start_fake
):
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    for _ in range(2):
        for lines, digest in ((ENGINES["skopeo"], listed.digest), (SCHEMA2_ONLY, None)):
            response = await pull_tag(proxyd, lines)
            assert response.status == 200
            wanted = digest or listed.amd64_digest
            assert response.headers["Docker-Content-Digest"] == wanted
    # The schema 2 client's own question went upstream once; then both were answered
    # from the one record of the tag.
    asked = [(s.method, s.headers.getall("Accept")) for s in upstream.requests()]
    assert asked == [("GET", ENGINES["skopeo"]), ("GET", SCHEMA2_ONLY)]


async def test_an_answer_upstream_rewrote_is_never_given_to_a_client_that_takes_the_list(
    make_proxyd, start_fake
):
    """A schema 2 client asked first: upstream rewrote the list into its amd64
    manifest. containerd on an arm64 node must still get the list itself."""
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    first = await pull_tag(proxyd, SCHEMA2_ONLY)
    assert first.headers["Docker-Content-Digest"] == listed.amd64_digest
    for name in ("containerd", "docker", "skopeo"):
        response = await pull_tag(proxyd, ENGINES[name])
        assert response.headers["Docker-Content-Digest"] == listed.digest, name
    assert [s.method for s in upstream.requests()] == ["GET", "GET"]


async def test_an_index_for_a_docker_schema2_client_is_its_own_404(make_proxyd, start_fake):
    upstream = NegotiatingRegistry()
    index = upstream.tags["v1"] = make_list(OCI_INDEX)
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    assert (await pull_tag(proxyd, ENGINES["podman"])).headers[
        "Docker-Content-Digest"
    ] == index.digest
    refused = await pull_tag(proxyd, SCHEMA2_ONLY)
    assert refused.status == 404
    assert await oci_code(refused) == "MANIFEST_UNKNOWN"
    again = await pull_tag(proxyd, ENGINES["containerd"])
    assert again.headers["X-Proxyd-Cache"] == "hit"  # the 404 replaced nothing


async def test_after_the_ttl_one_head_revalidates_every_answer_of_the_tag(make_proxyd, start_fake):
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    clock = FakeClock()
    proxyd = await make_proxyd(config(await start_fake(upstream), 60), clock=clock)
    await pull_tag(proxyd, ENGINES["skopeo"])
    await pull_tag(proxyd, SCHEMA2_ONLY)
    clock.advance(61)
    caches = {}
    for name, lines in [*ENGINES.items(), ("schema 2 only", SCHEMA2_ONLY)]:
        response = await pull_tag(proxyd, lines, "HEAD")
        assert response.status == 200
        wanted = listed.amd64_digest if lines == SCHEMA2_ONLY else listed.digest
        assert response.headers["Docker-Content-Digest"] == wanted, name
        caches[name] = response.headers["X-Proxyd-Cache"]
    assert caches["docker"] == "revalidated"
    assert set(caches.values()) - {"revalidated"} == {"hit"}
    heads = [s for s in upstream.requests() if s.method == "HEAD"]
    assert len(heads) == 1  # however many Accept sets were served
    # with the Accept that produced the answer it compares against (the first)
    assert heads[0].headers.getall("Accept") == ENGINES["skopeo"]
    assert [s.method for s in upstream.requests()] == ["GET", "GET", "HEAD"]


async def test_a_tag_that_moved_loses_every_answer_it_had(make_proxyd, start_fake):
    upstream = NegotiatingRegistry()
    upstream.tags["v1"] = make_list()
    clock = FakeClock()
    proxyd = await make_proxyd(config(await start_fake(upstream), 60), clock=clock)
    await pull_tag(proxyd, ENGINES["skopeo"])
    await pull_tag(proxyd, SCHEMA2_ONLY)
    moved = upstream.tags["v1"] = make_list(seed="2")
    clock.advance(61)
    for lines, wanted in ((SCHEMA2_ONLY, moved.amd64_digest), (ENGINES["podman"], moved.digest)):
        response = await pull_tag(proxyd, lines)
        assert response.headers["Docker-Content-Digest"] == wanted
        assert await response.read() in (moved.body, moved.amd64)
    assert [s.method for s in upstream.requests()] == ["GET", "GET", "HEAD", "GET", "GET"]


async def test_during_an_outage_every_client_gets_the_stale_answer_it_can_take(
    make_proxyd, start_fake
):
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    clock = FakeClock()
    proxyd = await make_proxyd(config(await start_fake(upstream), 60), clock=clock)
    await pull_tag(proxyd, ENGINES["prefetch"])
    await pull_tag(proxyd, SCHEMA2_ONLY)
    upstream.status = 503
    clock.advance(61)
    for name, lines in [*ENGINES.items(), ("schema 2 only", SCHEMA2_ONLY)]:
        response = await pull_tag(proxyd, lines)
        assert response.status == 200, name
        assert response.headers["X-Proxyd-Cache"] == "stale", name
        wanted = listed.amd64_digest if lines == SCHEMA2_ONLY else listed.digest
        assert response.headers["Docker-Content-Digest"] == wanted, name
    # A client that can take neither answer gets the upstream's failure.
    nothing_cached_for_it = await pull_tag(proxyd, [OCI_MANIFEST])
    assert nothing_cached_for_it.status == 502


async def test_clients_asking_at_once_with_different_accept_sets_share_one_upstream_get(
    make_proxyd, start_fake
):
    upstream = NegotiatingRegistry(gate=asyncio.Event())
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    pulls = [asyncio.ensure_future(pull_tag(proxyd, lines)) for lines in ENGINES.values()]
    try:
        await until(lambda: joined(proxyd) == len(ENGINES) - 1)
    finally:
        upstream.gate.set()
    answers = await asyncio.gather(*pulls)
    assert {a.headers["Docker-Content-Digest"] for a in answers} == {listed.digest}
    assert [s.method for s in upstream.requests()] == ["GET"]


async def test_a_joined_client_that_cannot_take_the_answer_asks_on_its_own(make_proxyd, start_fake):
    upstream = NegotiatingRegistry(gate=asyncio.Event())
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    first = asyncio.ensure_future(pull_tag(proxyd, ENGINES["skopeo"]))
    try:
        await until(lambda: len(upstream.requests("GET")) == 1)
        second = asyncio.ensure_future(pull_tag(proxyd, SCHEMA2_ONLY))
        await until(lambda: joined(proxyd) == 1)
    finally:
        upstream.gate.set()
    assert (await first).headers["Docker-Content-Digest"] == listed.digest
    assert (await second).headers["Docker-Content-Digest"] == listed.amd64_digest
    assert [s.headers.getall("Accept") for s in upstream.requests()] == [
        ENGINES["skopeo"],
        SCHEMA2_ONLY,
    ]


async def test_a_record_of_an_older_proxyd_or_a_damaged_one_is_ignored(make_proxyd, start_fake):
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    server = await start_fake(upstream)
    key = f"tag {host(server)} team/app v1"
    unreadable = [
        # what proxyd kept for a tag before records had a version
        {"digest": listed.digest, "media_type": DOCKER_LIST, "body": "e30="},
        {"version": 3, "answers": []},  # a newer proxyd's
        {"version": 2, "answers": [{"digest": listed.digest}]},
        {  # bytes that are not their digest (a shared Redis someone wrote to)
            "version": 2,
            "answers": [
                {
                    "media_type": DOCKER_LIST,
                    "digest": listed.digest,
                    "upstream_digest": listed.digest,
                    "accept": [DOCKER_LIST],
                    "body": "e30=",
                }
            ],
        },
    ]
    for value in unreadable:
        proxyd = await make_proxyd(config(server))  # nothing remembered in its memory
        small = proxyd.server.app[RESOLVER].small
        await small.put(key, value)
        with capture_logs() as events:
            response = await pull_tag(proxyd, ENGINES["docker"])
        assert response.status == 200, value
        assert response.headers["X-Proxyd-Cache"] == "miss", value
        assert await response.read() == listed.body
        assert "cache.record_ignored" in [e["event"] for e in events], value
        entry = await small.get(key)
        assert entry is not None and entry.value["version"] == 2
    assert len(upstream.requests("GET")) == len(unreadable)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def test_replicas_sharing_redis_serve_every_engine_from_one_resolution(
    make_proxyd, start_fake, redis_server
):
    assert redis_server.command("FLUSHDB") == "+OK"
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    server = await start_fake(upstream)
    shared = ["[cache]", 'backend = "redis"', f'redis_url = "{redis_server.url}"']
    replicas = [await make_proxyd(config(server, 300, *shared)) for _ in range(2)]
    for name, lines in ENGINES.items():
        for replica in replicas:
            response = await pull_tag(replica, lines)
            assert response.headers["Docker-Content-Digest"] == listed.digest, name
    assert [s.method for s in upstream.requests()] == ["GET"]


async def test_answers_remembered_on_the_connection_follow_the_same_rule(make_proxyd, start_fake):
    """The connection's remembered answers (proxyd/server/fastpath.py) are kept by the
    exact Accept lines; each engine's lines get the answer the tag's record gives them."""
    upstream = NegotiatingRegistry()
    listed = upstream.tags["v1"] = make_list()
    proxyd = await make_proxyd(config(await start_fake(upstream)))
    await pull_tag(proxyd, ENGINES["skopeo"])
    await pull_tag(proxyd, SCHEMA2_ONLY)
    conn = await Connection.open(proxyd)
    for lines in (ENGINES["skopeo"], SCHEMA2_ONLY, ENGINES["containerd"], SCHEMA2_ONLY):
        wanted = listed.amd64_digest if lines == SCHEMA2_ONLY else listed.digest
        for _ in range(2):  # the handler's answer, then (remembered) the connection's
            await conn.send(get("/v2/team/app/manifests/v1", *(f"Accept: {a}" for a in lines)))
            status, headers, _ = await conn.response()
            assert (status, headers["docker-content-digest"]) == (200, wanted), lines
    conn.close()
    assert proxyd.server.app[FAST].answered == 5
    assert len(upstream.requests()) == 2
