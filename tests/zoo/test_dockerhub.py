"""skopeo pulls Docker Hub's images through proxyd (tests/zoo/dockerhub.py): anonymous
tokens from a realm on another host, blobs from a CDN that must not see the registry's
credentials, and a pull limit that refuses manifest GETs only."""

from __future__ import annotations

import pytest

from tests.conftest import FakeClock, oci_code
from tests.peers.clients import PulledImage
from tests.peers.image import BuiltImage
from tests.zoo.dockerhub import DockerHub

pytestmark = pytest.mark.peers

METER = "X-Hub-Meter"  # a header configured for the registry alone, as a key would be


def hub_config(hub: DockerHub, *extra: str) -> str:
    lines = [
        'default_namespace = "docker.io"',
        '[namespaces."docker.io"]',
        f'server = "{hub.origin}"',
    ]
    return "\n".join([*lines, *extra])


def assert_pulled(pulled: PulledImage, image: BuiltImage) -> None:
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.blob_digests == set(image.blob_digests)


def digest_in(path: str) -> str:
    return path.rpartition("/")[2]


async def test_a_pull_asks_one_anonymous_token_per_repository_and_gets_blobs_from_the_cdn(
    make_proxyd, docker_hub, images, skopeo_through
):
    proxyd = await make_proxyd(hub_config(docker_hub))

    alpine = await skopeo_through.pull(proxyd, "library/alpine:3")
    busybox = await skopeo_through.pull(proxyd, "library/busybox:latest")

    assert_pulled(alpine, images.alpine)
    assert_pulled(busybox, images.busybox)
    asked = docker_hub.auth.recorded()
    assert [r.query_values("scope") for r in asked] == [
        ["repository:library/alpine:pull"],
        ["repository:library/busybox:pull"],
    ]
    assert all(r.query_values("service") == ["registry.docker.io"] for r in asked)
    assert all(r.header("Authorization") is None for r in asked), "anonymous"
    # One challenge taught proxyd the realm; from then on each repository's own token.
    seen = docker_hub.recorded()
    assert [r.header("Authorization") for r in seen].count(None) == 1
    issued = {next(iter(grant.access)): token for token, grant in docker_hub.auth.issued()}
    for request in seen[1:]:
        repository = request.path.removeprefix("/v2/").rsplit("/", 2)[0]
        assert request.header("Authorization") == f"Bearer {issued[repository]}"
    # Every blob GET was sent to the CDN, which had them without the registry's token.
    blobs = {*images.alpine.blob_digests, *images.busybox.blob_digests}
    assert sorted(digest_in(r.path) for r in docker_hub.recorded("blobs", "GET")) == sorted(blobs)
    storage = docker_hub.storage
    assert sorted(storage.served) == sorted(storage.path_of(d) for d in blobs)
    assert all(r.header("Authorization") is None for r in storage.recorded())


async def test_configured_headers_reach_docker_hub_but_not_its_token_service(
    make_proxyd, docker_hub, skopeo_through
):
    """The realm is on another origin: the registry's headers stay with the registry."""
    proxyd = await make_proxyd(hub_config(docker_hub, f'header = {{ "{METER}" = "m-4471" }}'))

    await skopeo_through.pull(proxyd, "library/alpine:3")

    assert all(r.header(METER) == "m-4471" for r in docker_hub.recorded())
    assert all(r.header(METER) is None for r in docker_hub.auth.recorded())


async def test_configured_headers_never_reach_the_cdn_blobs_are_redirected_to(
    make_proxyd, docker_hub, images, skopeo_through
):
    docker_hub.storage.refuse_headers.add(METER.lower())
    proxyd = await make_proxyd(hub_config(docker_hub, f'header = {{ "{METER}" = "m-4471" }}'))

    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)

    assert all(r.header(METER) is None for r in docker_hub.storage.recorded())


async def test_the_pull_limit_refuses_manifest_gets_only_and_pulls_go_on_from_cache(
    make_proxyd, docker_hub, images, skopeo_through
):
    """alpine is pulled with the last pull the limit left; busybox's manifest GET is then
    refused 429, while its blobs (what a pull in progress asks for next) keep coming. Once
    alpine's tag is due it is revalidated by HEAD, which Hub does not count."""
    docker_hub.pull_limit = 1
    clock = FakeClock()
    proxyd = await make_proxyd(hub_config(docker_hub), clock=clock)
    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)

    # Asked directly: skopeo meets a 429 without Retry-After by asking again for 30 s.
    refused = await proxyd.get("/v2/library/busybox/manifests/latest")
    assert refused.status == 429
    assert await oci_code(refused) == "TOOMANYREQUESTS"
    for digest in images.busybox.blob_digests:
        blob = await proxyd.get(f"/v2/library/busybox/blobs/{digest}")
        assert blob.status == 200
        assert await blob.read() == images.busybox.blob(digest)

    clock.advance(61)  # past the tag's 60 s
    heads = len(docker_hub.recorded("manifests", "HEAD"))
    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)
    assert len(docker_hub.recorded("manifests", "HEAD")) == heads + 1
    assert docker_hub.pulls == 1, "one pull counted: alpine's manifest GET"
    metrics = await (await proxyd.get("/metrics")).text()
    assert f'proxyd_upstream_ratelimit_remaining{{host="{docker_hub.host}"}} 0.0' in metrics


async def test_blobs_already_held_are_confirmed_for_another_repository_by_head_via_the_cdn(
    make_proxyd, docker_hub, images, skopeo_through
):
    """The same layers under another repository (a base image's, say): proxyd serves
    them from its store once Hub confirms the repository holds them, by a HEAD that Hub
    redirects too, with a URL signed for HEAD."""
    docker_hub.add("someone/alpine", images.alpine, "3")
    docker_hub.publish("someone/alpine")
    proxyd = await make_proxyd(hub_config(docker_hub))
    await skopeo_through.pull(proxyd, "library/alpine:3")
    served = len(docker_hub.storage.served)

    assert_pulled(await skopeo_through.pull(proxyd, "someone/alpine:3"), images.alpine)

    assert len(docker_hub.storage.served) == served, "no blob sent twice"
    heads = [r for r in docker_hub.storage.recorded() if r.method == "HEAD"]
    assert sorted(r.path for r in heads) == sorted(
        docker_hub.storage.path_of(d) for d in images.alpine.blob_digests
    )
