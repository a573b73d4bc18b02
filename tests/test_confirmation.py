"""Who may say that a repository holds a digest: proxyd serves a stored blob to a
repository only once a host trusted with its names (`resolve`) said so, never on a
pull-only mirror's word, and links a repository only to bytes that were verified.

The lying mirror is a fake (tests/fakes.py `claims_every_blob`): a real registry does
not answer 200 to a HEAD of every blob, but a compromised or broken mirror may, and it
must not unlock what proxyd keeps from a private repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxyd.reference import Digest
from proxyd.store import BlobStore
from tests.conftest import host, oci_code, origin, until, until_stored
from tests.fakes import FakeRegistry, make_image


def chain(upstream: Any, mirror: Any, *extra: str) -> str:
    """The upstream (every capability) behind a pull-only mirror."""
    return "\n".join(
        [
            f'default_namespace = "{host(upstream)}"',
            f'[namespaces."{host(upstream)}"]',
            f'server = "{origin(upstream)}"',
            f'[namespaces."{host(upstream)}".host."{origin(mirror)}"]',
            'capabilities = ["pull"]',
            *extra,
        ]
    )


async def fetched_from(proxyd: Any, server: Any, size: int) -> bool:
    """Whether proxyd's downloads from `server` have ended with `size` bytes in all (the
    count is made as a download is done with)."""
    metrics = await (await proxyd.get("/metrics")).text()
    line = f'proxyd_upstream_fetched_bytes_total{{host="{host(server)}"}} '
    return any(
        float(text.removeprefix(line)) >= size
        for text in metrics.splitlines()
        if text.startswith(line)
    )


def linked(cache_dir: Path, server: Any, repository: str, digest: str) -> bool:
    return BlobStore(cache_dir).linked(host(server), repository, Digest.parse(digest)) is not None


async def test_a_mirror_answering_every_head_unlocks_no_private_blob(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry(basic=("alice", "wonderland"))
    private = upstream.add(make_image("priv/a", layer=b"private-layer" * 1000))
    upstream.add(make_image("pub/b"))
    mirror = FakeRegistry(claims_every_blob=True)
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(
        chain(
            server,
            mirror_server,
            f'[credentials."{host(server)}"]',
            'username = "alice"',
            'password = "wonderland"',
        )
    )
    secret = private.layer
    assert await (await proxyd.get(f"/v2/priv/a/blobs/{secret}")).read() == private.blobs[secret]
    await until(lambda: fetched_from(proxyd, server, len(private.blobs[secret])))  # stored

    for repository in ("pub/b", "other/c"):  # upstream holds pub/b, not the secret in it
        for method in ("GET", "HEAD"):
            response = await proxyd.request(method, f"/v2/{repository}/blobs/{secret}")
            assert response.status == 404, (repository, method)
            if method == "GET":
                assert await oci_code(response) == "BLOB_UNKNOWN"
    assert not linked(cache_dir, server, "pub/b", secret)
    # A GET asks upstream to confirm, then the pull chain for the mirror's own bytes.
    methods = [s.method for s in upstream.requests(f"pub/b/blobs/{secret}")]
    assert methods == ["HEAD", "GET", "HEAD"]
    assert [s.method for s in mirror.requests(f"pub/b/blobs/{secret}")] == ["GET"]
    assert not [s for s in mirror.seen if s.method == "HEAD"], "a mirror was asked to vouch"


async def test_a_blob_a_pull_only_mirror_served_is_linked_once_the_upstream_confirms_it(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    mirror = FakeRegistry()
    mirror.add(image)
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(chain(server, mirror_server))
    layer = image.layer
    response = await proxyd.get(f"/v2/team/app/blobs/{layer}")
    assert await response.read() == image.blobs[layer]
    assert [s.method for s in mirror.requests(layer)] == ["GET"]
    await until(lambda: linked(cache_dir, server, "team/app", layer))
    assert [s.method for s in upstream.requests(layer)] == ["HEAD"]  # no GET upstream

    again = await proxyd.get(f"/v2/team/app/blobs/{layer}")
    assert again.headers["X-Proxyd-Cache"] == "hit"
    assert await again.read() == image.blobs[layer]
    assert len(upstream.requests(layer)) == len(mirror.requests(layer)) == 1


async def test_the_upstreams_own_bytes_link_at_once_without_a_head(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    mirror_server = await start_fake(FakeRegistry())  # holds nothing: 404, the upstream serves
    proxyd = await make_proxyd(chain(server, mirror_server))
    response = await proxyd.get(f"/v2/team/app/blobs/{image.layer}")
    assert await response.read() == image.blobs[image.layer]
    assert linked(cache_dir, server, "team/app", image.layer)
    assert [s.method for s in upstream.requests(image.layer)] == ["GET"]


async def test_a_mirrors_bytes_for_a_repository_upstream_denies_are_never_served_from_the_store(
    make_proxyd, start_fake, cache_dir
):
    """The mirror may serve its own verified bytes (as containerd would pull them from
    it), each time; proxyd's copy is never linked to that repository."""
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    mirror = FakeRegistry()
    image = mirror.add(make_image("team/gone"))
    mirror_server = await start_fake(mirror)
    proxyd = await make_proxyd(chain(server, mirror_server))
    layer, size = image.layer, len(image.blobs[image.layer])
    for number in (1, 2):
        response = await proxyd.get(f"/v2/team/gone/blobs/{layer}")
        assert await response.read() == image.blobs[layer]
        assert response.headers["X-Proxyd-Cache"] == "miss"
        await until(lambda n=number: fetched_from(proxyd, mirror_server, n * size))
    await until_stored(cache_dir, layer)
    assert not linked(cache_dir, server, "team/gone", layer)
    assert [s.method for s in mirror.requests(layer)] == ["GET", "GET"]
    # Asked to confirm after each download, and once for the stored copy: 404 each time.
    assert [s.method for s in upstream.requests(layer)] == ["HEAD"] * 3


async def test_no_link_is_written_for_bytes_that_failed_verification(
    make_proxyd, start_fake, cache_dir
):
    """A repository that sent wrong bytes has confirmed nothing: once the digest is
    stored through another repository, and the first one no longer holds it
    upstream, proxyd asks again instead of serving it there."""
    upstream = FakeRegistry(corrupt=True)
    shared = b"shared-layer" * 1000
    one = upstream.add(make_image("team/one", layer=shared))
    two = upstream.add(make_image("team/two", layer=shared))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(
        f'default_namespace = "{host(server)}"\n'
        f'[namespaces."{host(server)}"]\nserver = "{origin(server)}"'
    )
    layer = one.layer
    failed = await proxyd.get(f"/v2/team/one/blobs/{layer}")
    with pytest.raises(aiohttp.ClientPayloadError):  # cut short: the digest did not match
        await failed.read()
    await until(lambda: fetched_from(proxyd, server, len(shared)))  # the download is over
    assert not linked(cache_dir, server, "team/one", layer)

    upstream.corrupt = False
    upstream.images.remove(one)
    assert await (await proxyd.get(f"/v2/team/two/blobs/{layer}")).read() == two.blobs[layer]
    refused = await proxyd.get(f"/v2/team/one/blobs/{layer}")
    assert refused.status == 404
