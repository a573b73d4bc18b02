"""The chain as containerd walks it (core/remotes/docker/resolver.go and fetcher.go):
which answers move on to the next host, which are asked again of the same host and
how long proxyd waits first, what a host's rate limit stops, what a mirror's failed
body costs it, and the `ns=` each host is told. Fake registries on real ports
misbehave on demand (tests/fakes.py); proxyd's clock is a FakeClock, so each wait is
read from it instead of waited for."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from proxyd import runtime as runtime_module
from proxyd.config import load_settings
from proxyd.exchange import TLSSetupError
from proxyd.hosts import Capability, RegistryHost
from proxyd.runtime import build_runtime
from tests.conftest import FakeClock, host, oci_code, origin
from tests.fakes import FakeRegistry, make_image

MIRROR_READ_TIMEOUT = 0.3


def chain(upstream: Any, *mirrors: Any, settings: tuple[str, ...] = ()) -> str:
    """proxyd for the upstream's namespace (its host:port), the mirrors tried first."""
    name = host(upstream)
    lines = [
        f'default_namespace = "{name}"',
        *settings,
        f'[namespaces."{name}"]',
        f'server = "{origin(upstream)}"',
    ]
    for mirror in mirrors:
        lines += [
            f'[namespaces."{name}".host."{origin(mirror)}"]',
            'capabilities = ["pull", "resolve"]',
            f"read_timeout = {MIRROR_READ_TIMEOUT}",
        ]
    return "\n".join(lines)


def manifest_asks(registry: FakeRegistry) -> list[str]:
    return [s.method for s in registry.requests("/manifests/")]


# -- asked again of the same host ---------------------------------------------------------


async def test_a_503_of_the_last_host_is_asked_again_after_a_short_wait(make_proxyd, start_fake):
    upstream = FakeRegistry(script=[503])
    image = upstream.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=clock)
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest
    assert manifest_asks(upstream) == ["GET", "GET"]
    assert clock.slept == [0.05]


@pytest.mark.parametrize(
    ("script", "asked", "status"),
    [
        ([503, 503, 503], 2, 502),  # the same status twice in a row is the answer
        ([500, 503, 504], 4, 200),  # each new 5xx is asked again
        ([502], 1, 502),  # 502 is not among the statuses containerd retries
    ],
)
async def test_5xx_of_the_last_host_are_asked_again_as_containerd_does(
    make_proxyd, start_fake, script, asked, status
):
    upstream = FakeRegistry(script=list(script))
    upstream.add(make_image())
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=FakeClock())
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == status
    assert len(manifest_asks(upstream)) == asked


async def test_a_mirrors_5xx_moves_on_at_once_without_asking_it_again(make_proxyd, start_fake):
    upstream, mirror = FakeRegistry(), FakeRegistry(script=[503])
    image = upstream.add(make_image())
    mirror.add(image)
    clock = FakeClock()
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), await start_fake(mirror)), clock=clock
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert manifest_asks(mirror) == ["GET"]
    assert manifest_asks(upstream) == ["GET"]
    assert clock.slept == []


@pytest.mark.parametrize("status", [408, 429])
async def test_408_and_429_are_asked_again_even_of_a_mirror(make_proxyd, start_fake, status):
    upstream, mirror = FakeRegistry(), FakeRegistry(script=[status])
    mirror.add(upstream.add(make_image()))
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), await start_fake(mirror)), clock=FakeClock()
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert manifest_asks(mirror) == ["GET", "GET"]
    assert upstream.seen == []


async def test_a_retry_after_within_the_budget_is_waited_for(make_proxyd, start_fake):
    upstream = FakeRegistry(script=[429], retry_after="3")
    upstream.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=clock)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert clock.slept == [3.0]


async def test_retries_stop_after_five_attempts(make_proxyd, start_fake):
    upstream = FakeRegistry(status=429)
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=clock)
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 429
    assert len(upstream.seen) == 5  # containerd's maxAttempts
    assert clock.slept == [0.05, 0.1, 0.2, 0.4]


async def test_retries_stop_when_the_requests_budget_is_spent(make_proxyd, start_fake):
    upstream = FakeRegistry(status=429, retry_after="2")
    clock = FakeClock()
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), settings=("retry_max_wait = 5",)), clock=clock
    )
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 429  # a third wait of 2 s would end past the 5 s
    assert clock.slept == [2.0, 2.0]
    assert len(upstream.seen) == 3
    assert response.headers["Retry-After"] == "2"


# aiohttp itself sends an idempotent request once more when the server closed the
# connection before answering (RFC 9112, "Retrying Requests"): each proxyd attempt
# below is two requests until the second is answered.


async def test_a_connection_the_last_host_closed_unanswered_is_asked_again(make_proxyd, start_fake):
    upstream = FakeRegistry(disconnect_first=2)
    upstream.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=clock)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert manifest_asks(upstream) == ["GET", "GET", "GET"]
    assert clock.slept == [0.05]


async def test_a_mirror_that_closed_the_connection_unanswered_is_left_for_the_next_host(
    make_proxyd, start_fake
):
    upstream, mirror = FakeRegistry(), FakeRegistry(disconnect_first=2)
    mirror.add(upstream.add(make_image()))
    clock = FakeClock()
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), await start_fake(mirror)), clock=clock
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert manifest_asks(mirror) == ["GET", "GET"]  # one attempt: aiohttp's two
    assert manifest_asks(upstream) == ["GET"]
    assert clock.slept == []


async def test_a_registry_refusing_head_of_a_manifest_is_asked_with_get(make_proxyd, start_fake):
    """Revalidation asks HEAD; a 405 there must not freeze the cached tag."""
    upstream = FakeRegistry(no_manifest_head=True)
    upstream.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=clock)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    moved = make_image(layer=b"the tag moved")
    upstream.images[0] = moved
    clock.advance(61)  # past the tag's TTL
    again = await proxyd.get("/v2/team/app/manifests/v1")
    assert again.status == 200
    assert await again.read() == moved.manifest
    assert again.headers["X-Proxyd-Cache"] != "stale"
    assert manifest_asks(upstream)[1:3] == ["HEAD", "GET"]


# -- moved on to the next host ---------------------------------------------------------


@pytest.mark.parametrize("status", [400, 405, 410])
async def test_a_mirrors_4xx_moves_on_to_the_next_host(make_proxyd, start_fake, status):
    upstream, mirror = FakeRegistry(), FakeRegistry(status=status)
    image = upstream.add(make_image())
    proxyd = await make_proxyd(chain(await start_fake(upstream), await start_fake(mirror)))
    for path in ("manifests/v1", f"blobs/{image.layer}"):
        response = await proxyd.get(f"/v2/team/app/{path}")
        assert response.status == 200, path
    assert len(mirror.seen) == 2


async def test_the_upstreams_own_4xx_is_final(make_proxyd, start_fake):
    upstream = FakeRegistry(status=410)
    proxyd = await make_proxyd(chain(await start_fake(upstream)), clock=FakeClock())
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 502
    assert "410" in (await response.json())["errors"][0]["message"]
    assert len(upstream.seen) == 1


async def test_a_mirrors_manifest_over_the_size_limit_moves_on_to_the_next_host(
    make_proxyd, start_fake
):
    upstream, mirror = FakeRegistry(), FakeRegistry(pad_manifests=5000)
    image = upstream.add(make_image())
    mirror.add(image)
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), await start_fake(mirror)), max_manifest_size=2000
    )
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest
    assert manifest_asks(mirror) == ["GET"]


async def test_a_mirrors_manifest_growing_past_the_limit_sends_the_next_request_on(
    make_proxyd, start_fake
):
    """Without a Content-Length the size shows only while the body is read: that
    request fails, and the mirror is left out of the next one."""
    upstream = FakeRegistry()
    mirror = FakeRegistry(pad_manifests=5000, chunked_manifests=True)
    image = upstream.add(make_image())
    mirror.add(image)
    proxyd = await make_proxyd(
        chain(await start_fake(upstream), await start_fake(mirror)), max_manifest_size=2000
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 413
    response = await proxyd.get("/v2/team/app/manifests/v1")
    assert response.status == 200
    assert await response.read() == image.manifest
    assert manifest_asks(mirror) == ["GET"]


def stalling(mirror: FakeRegistry) -> None:
    mirror.gate = asyncio.Event()  # the last byte never comes: the mirror's read times out


@pytest.mark.parametrize(
    "misbehave",
    [
        lambda mirror: setattr(mirror, "corrupt", True),
        lambda mirror: setattr(mirror, "drop_after", 100),
        stalling,
    ],
    ids=["digest-mismatch", "truncated", "stalled"],
)
async def test_a_mirrors_failed_body_fails_the_transfer_and_the_next_request_goes_on(
    make_proxyd, start_fake, misbehave
):
    """Issue 16, item 4: the bad body is that mirror's failure, not a success."""
    upstream, mirror = FakeRegistry(), FakeRegistry()
    image = upstream.add(make_image())
    mirror.add(image)
    misbehave(mirror)
    proxyd = await make_proxyd(chain(await start_fake(upstream), await start_fake(mirror)))
    blob = f"/v2/team/app/blobs/{image.layer}"
    try:
        failed = await proxyd.get(blob)
        with pytest.raises(aiohttp.ClientPayloadError):
            await failed.read()
        response = await proxyd.get(blob)
        assert await response.read() == image.blobs[image.layer]
        assert [s.path for s in mirror.requests("/blobs/")] == [blob]
        assert [s.path for s in upstream.requests("/blobs/")] == [blob]
    finally:
        if mirror.gate is not None:
            mirror.gate.set()


async def test_a_mirror_that_keeps_sending_bad_bodies_opens_its_circuit(make_proxyd, start_fake):
    upstream, mirror = FakeRegistry(), FakeRegistry(corrupt=True)
    images = [upstream.add(make_image(layer=f"layer {n}".encode())) for n in range(3)]
    for image in images:
        mirror.add(image)
    proxyd = await make_proxyd(
        chain(
            await start_fake(upstream), await start_fake(mirror), settings=("breaker_failures = 2",)
        )
    )
    for image in images[:2]:
        failed = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
        with pytest.raises(aiohttp.ClientPayloadError):
            await failed.read()
    third = await proxyd.get(f"/v2/team/app/blobs/{images[2].layer}")
    assert await third.read() == images[2].blobs[images[2].layer]
    assert len(mirror.requests("/blobs/")) == 2


# -- rate limits: Docker Hub's, per host and kind of request ------------------------------


async def test_a_manifest_429_never_stops_blob_pulls(make_proxyd, start_fake):
    """Docker Hub limits manifest GETs only; a Retry-After too long to wait for pauses
    those, and blobs keep coming."""
    hub = FakeRegistry(pull_limit=0, retry_after="3600")
    image = hub.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(hub)), clock=clock)
    limited = await proxyd.get(f"/v2/team/app/manifests/{image.digest}")
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "3600"
    assert clock.slept == []  # an hour is not waited for
    again = await proxyd.get("/v2/team/app/manifests/v1")
    assert again.status == 429
    assert await oci_code(again) == "TOOMANYREQUESTS"
    assert len(hub.requests("/manifests/")) == 1  # remembered: not asked again
    for digest, blob in image.blobs.items():
        response = await proxyd.get(f"/v2/team/app/blobs/{digest}")
        assert response.status == 200
        assert await response.read() == blob
    clock.advance(3601)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 429
    assert len(hub.requests("/manifests/")) == 2  # asked again once the hour is over


async def test_a_429_naming_no_wait_pauses_that_kind_of_request_for_a_minute(
    make_proxyd, start_fake
):
    """Docker Hub's pull limit answers 429 with no Retry-After (docs.docker.com,
    "Docker Hub usage and limits": only the RateLimit-* headers). containerd's five
    quick attempts are made once; then manifest GETs are left alone for a minute, the
    client is told so (Retry-After) in the registry's own words, and clients asking
    meanwhile cost the host nothing."""
    hub = FakeRegistry(pull_limit=0)
    image = hub.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(hub)), clock=clock)
    limited = await proxyd.get(f"/v2/team/app/manifests/{image.digest}")
    assert limited.status == 429
    assert limited.headers["Retry-After"] == "60"
    assert "You have reached your pull rate limit" in (await limited.json())["errors"][0]["message"]
    asked = len(hub.requests("/manifests/"))
    assert asked == 5  # containerd's attempts, within the request's retry budget
    for _ in range(10):
        assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 429
    assert len(hub.requests("/manifests/")) == asked  # the minute: not asked again
    clock.advance(61)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 429
    assert len(hub.requests("/manifests/")) > asked  # asked again once it is over


async def test_a_cached_tag_is_served_stale_while_the_host_rate_limits(make_proxyd, start_fake):
    hub = FakeRegistry(pull_limit=1, retry_after="3600")
    first = hub.add(make_image())
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(hub)), clock=clock)
    assert await (await proxyd.get("/v2/team/app/manifests/v1")).read() == first.manifest
    hub.images[0] = make_image(layer=b"the tag moved")
    clock.advance(61)
    stale = await proxyd.get("/v2/team/app/manifests/v1")
    assert stale.status == 200
    assert stale.headers["X-Proxyd-Cache"] == "stale"
    assert await stale.read() == first.manifest
    assert manifest_asks(hub) == ["GET", "HEAD", "GET"]  # the HEAD saw it move; GET: 429


async def test_an_unchanged_tag_is_revalidated_by_head_while_gets_are_limited(
    make_proxyd, start_fake
):
    """Docker Hub counts no HEAD: revalidation keeps working after the last pull, and a
    GET's 429 pauses GETs only."""
    hub = FakeRegistry(pull_limit=1, retry_after="3600")
    image = hub.add(make_image())
    hub.add(make_image(tag="v2", layer=b"another"))
    clock = FakeClock()
    proxyd = await make_proxyd(chain(await start_fake(hub)), clock=clock)
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert (await proxyd.get("/v2/team/app/manifests/v2")).status == 429
    for _ in range(3):
        clock.advance(61)
        again = await proxyd.get("/v2/team/app/manifests/v1")
        assert again.headers["X-Proxyd-Cache"] == "revalidated"
        assert await again.read() == image.manifest
    assert manifest_asks(hub) == ["GET", "GET", "HEAD", "HEAD", "HEAD"]


# -- ns= --------------------------------------------------------------------------------


async def test_ns_is_sent_to_every_host_but_the_namespaces_own(make_proxyd, start_fake):
    upstream, mirror = FakeRegistry(), FakeRegistry()
    image = upstream.add(make_image())
    mirror.add(image)
    upstream_server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(chain(upstream_server, mirror_server))
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert (await proxyd.get(f"/v2/team/app/blobs/{image.layer}")).status == 200
    mirror.status = 404  # the mirror lacks the config: the upstream answers
    assert (await proxyd.get(f"/v2/team/app/blobs/{image.config}")).status == 200
    assert [s.query for s in mirror.seen] == [{"ns": host(upstream_server)}] * 3
    assert [s.query for s in upstream.seen] == [{}]


async def test_ns_is_sent_to_an_upstream_server_on_another_host(make_proxyd, start_fake):
    """containerd's isProxy: the namespace `registry.test` served from elsewhere."""
    upstream = FakeRegistry()
    upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        "\n".join(
            [
                'default_namespace = "registry.test"',
                '[namespaces."registry.test"]',
                f'server = "{origin(server)}"',
            ]
        )
    )
    assert (await proxyd.get("/v2/team/app/manifests/v1")).status == 200
    assert [s.query for s in upstream.seen] == [{"ns": "registry.test"}]


def test_docker_hub_is_its_own_registry_at_registry_1():
    def registry_host(name: str) -> RegistryHost:
        return RegistryHost("https", name, "/v2", Capability.all(), is_mirror=False)

    assert not registry_host("registry-1.docker.io").is_proxy("docker.io")
    assert not registry_host("ghcr.io").is_proxy("ghcr.io")
    assert registry_host("registry-1.docker.io").is_proxy("ghcr.io")
    assert registry_host("mirror.example:5000").is_proxy("docker.io")
    assert registry_host("docker.io").is_proxy("registry-1.docker.io")


# -- what a client may invent ------------------------------------------------------------


def test_namespaces_built_for_names_clients_send_are_bounded(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime_module, "MAX_SYNTHESISED_NAMESPACES", 2)
    runtime = build_runtime(
        load_settings(None, cache_dir=tmp_path, allow_unconfigured_namespaces=True)
    )
    first = runtime.namespace("a.example")
    runtime.namespace("b.example")
    assert runtime.namespace("a.example") is first  # kept, and now the most recent
    runtime.namespace("c.example")  # b, the least recently used, goes
    assert runtime.namespace("a.example") is first
    runtime.namespace("d.example")
    runtime.namespace("e.example")
    again = runtime.namespace("a.example")
    assert again is not first  # dropped meanwhile, built again when asked
    assert again == first


async def test_every_registry_a_client_names_shares_one_tls_context():
    from proxyd.upstream import UpstreamClient

    runtime = build_runtime(load_settings(None, allow_unconfigured_namespaces=True))
    async with UpstreamClient(runtime, user_agent="test") as client:
        contexts = set()
        for name in ("a.example", "b.example", "c.example"):
            namespace = runtime.namespace(name)
            assert namespace is not None
            contexts.add(id(client.exchange._ssl_for(namespace.hosts[0], same_origin=True)))
    assert len(contexts) == 1


async def test_a_host_with_no_tls_files_of_its_own_uses_aiohttps_verified_context() -> None:
    """No second copy of the system's CAs (0.8 MiB) for hosts that add nothing to them;
    a host's own CA, client certificate (towards itself) or skip_verify gets its own."""
    from proxyd.upstream import UpstreamClient

    plain = RegistryHost("https", "r.example", "/v2", Capability.all(), is_mirror=False)
    with_ca = replace(plain, ca=("/etc/ca.pem",))
    with_client = replace(plain, client=(("/etc/c.pem", None),))
    runtime = build_runtime(load_settings(None))
    async with UpstreamClient(runtime, user_agent="test") as client:
        ssl_for = client.exchange._ssl_for
        assert ssl_for(plain, same_origin=True) is True
        assert ssl_for(with_client, same_origin=False) is True  # a redirect: not its cert
        assert ssl_for(replace(plain, skip_verify=True), same_origin=True) is not True
        with pytest.raises(TLSSetupError):  # its own context: the file is read
            ssl_for(with_ca, same_origin=True)
        with pytest.raises(TLSSetupError):
            ssl_for(with_client, same_origin=True)
