"""Upstream faults, one at a time, against proxyd's app in one process: what the client
gets back, how soon, and that a failure leaves nothing behind in the cache.

Faults covered elsewhere are not repeated here: a corrupt blob byte, a truncated or
reset blob body (tests/test_pull.py), a hanging mirror (test_pull, test_breaker), a
token server that answers without a token (test_pull), 429 on a manifest (test_pull).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import host, origin, until, until_stored
from tests.fakes import FakeImage, FakeRegistry, make_image

# Nothing listens on port 1 of the loopback: a connection there is refused at once.
CLOSED_URL = "http://127.0.0.1:1"
READ_TIMEOUT = 0.3


def config(server: Any, *extra: str, mirror: Any = None, read_timeout: float | None = None) -> str:
    """proxyd in front of `server` (the only host, or behind `mirror`)."""
    lines = [
        f'default_namespace = "{host(server)}"',
        f'[namespaces."{host(server)}"]',
        f'server = "{origin(server)}"',
    ]
    if read_timeout is not None:
        lines.append(f"read_timeout = {read_timeout}")
    lines += extra
    if mirror is not None:
        lines += [
            f'[namespaces."{host(server)}".host."{origin(mirror)}"]',
            'capabilities = ["pull", "resolve"]',
        ]
    return "\n".join(lines)


def path_of(image: FakeImage, kind: str) -> str:
    """The API path of the image's manifest by tag, or of its layer."""
    if kind == "manifest":
        return f"/v2/{image.repository}/manifests/{image.tag}"
    return f"/v2/{image.repository}/blobs/{image.layer}"


def body_of(image: FakeImage, kind: str) -> bytes:
    return image.manifest if kind == "manifest" else image.blobs[image.layer]


async def assert_nothing_left(cache_dir: Path) -> None:
    """No download in progress remains in tmp/, and every stored file under blobs/ is
    what its name says (a failed fetch must not have been committed)."""
    await until(lambda: not any((cache_dir / "tmp").iterdir()))
    assert list((cache_dir / "tmp").iterdir()) == []
    for path in (cache_dir / "blobs").glob("*/*"):
        algorithm = path.parent.name
        assert hashlib.new(algorithm, path.read_bytes()).hexdigest() == path.name, path


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json()
    [error] = body["errors"]
    return dict(error)


# -- 5xx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["manifest", "blob"])
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_5xx_from_the_only_host_is_502_unavailable_naming_it(
    make_proxyd, start_fake, cache_dir, status, kind
):
    upstream = FakeRegistry(status=status)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server))

    response = await proxyd.get(path_of(image, kind))

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "UNAVAILABLE"
    assert host(server) in error["message"]
    assert str(status) in error["message"]
    await assert_nothing_left(cache_dir)


@pytest.mark.parametrize("kind", ["manifest", "blob"])
@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_5xx_from_a_mirror_falls_back_to_the_upstream(
    make_proxyd, start_fake, cache_dir, status, kind
):
    upstream, mirror = FakeRegistry(), FakeRegistry(status=status)
    image = upstream.add(make_image())
    mirror.add(image)
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(config(server, mirror=mirror_server))

    response = await proxyd.get(path_of(image, kind))

    assert response.status == 200
    assert await response.read() == body_of(image, kind)
    assert len(mirror.seen) == 1, "the mirror was not tried first"
    assert len(upstream.seen) == 1
    await assert_nothing_left(cache_dir)


# -- 429 ---------------------------------------------------------------------------------


async def test_a_429_on_a_blob_is_429_with_retry_after_and_keeps_nothing(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry(status=429, retry_after="11")
    image = upstream.add(make_image())
    proxyd = await make_proxyd(config(await start_fake(upstream)))

    response = await proxyd.get(path_of(image, "blob"))

    assert response.status == 429
    assert response.headers["Retry-After"] == "11"
    assert (await error_of(response))["code"] == "TOOMANYREQUESTS"
    await assert_nothing_left(cache_dir)


@pytest.mark.parametrize("kind", ["manifest", "blob"])
async def test_a_rate_limited_mirror_falls_back_to_the_upstream(
    make_proxyd, start_fake, cache_dir, kind
):
    upstream, mirror = FakeRegistry(), FakeRegistry(status=429, retry_after="30")
    image = upstream.add(make_image())
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(config(server, mirror=mirror_server))

    response = await proxyd.get(path_of(image, kind))

    assert response.status == 200
    assert "Retry-After" not in response.headers
    assert await response.read() == body_of(image, kind)
    assert mirror.seen
    await assert_nothing_left(cache_dir)


# -- hangs and slow bodies ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["manifest", "blob"])
async def test_a_hanging_only_host_is_cut_by_its_read_timeout(
    make_proxyd, start_fake, cache_dir, kind
):
    upstream = FakeRegistry(hang=True)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server, read_timeout=READ_TIMEOUT))

    started = time.monotonic()
    response = await asyncio.wait_for(proxyd.get(path_of(image, kind)), 10)
    elapsed = time.monotonic() - started

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "UNAVAILABLE"
    assert host(server) in error["message"]
    assert "timed out" in error["message"]
    assert elapsed < READ_TIMEOUT + 3, f"took {elapsed:.1f}s"
    await assert_nothing_left(cache_dir)


async def test_a_blob_that_stalls_mid_body_is_cut_by_the_read_timeout(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry(gate=asyncio.Event())  # never set: the last byte never comes
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server, read_timeout=READ_TIMEOUT))

    response = await proxyd.get(path_of(image, "blob"))
    assert response.status == 200  # headers went out before the stall
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(response.read(), 10)

    assert not (cache_dir / "blobs" / "sha256" / image.layer.split(":")[1]).exists()
    await assert_nothing_left(cache_dir)


async def test_a_slow_blob_drip_within_the_read_timeout_streams_to_the_client(
    make_proxyd, start_fake, cache_dir
):
    # 16 chunks 0.1 s apart: 1.5 s in all, five times the read timeout, yet no gap
    # between two chunks is longer than a third of it.
    upstream = FakeRegistry(drip=(64 * 1024, 0.1), gate=asyncio.Event())
    image = upstream.add(make_image(layer=bytes(range(256)) * 4096))  # 1 MiB
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server, read_timeout=READ_TIMEOUT))
    blob = body_of(image, "blob")

    started = time.monotonic()
    response = await proxyd.get(path_of(image, "blob"))
    assert response.status == 200
    first = await asyncio.wait_for(response.content.readany(), 5)
    assert first, "no bytes before the upload ended"
    assert blob.startswith(first)
    assert upstream.gate is not None
    upstream.gate.set()  # release the last byte: the upload can end now
    rest = await asyncio.wait_for(response.read(), 20)

    assert first + rest == blob
    assert time.monotonic() - started > 3 * READ_TIMEOUT, "the drip was not slow"
    await until_stored(cache_dir, image.layer)
    await assert_nothing_left(cache_dir)


async def test_a_slow_manifest_drip_within_the_read_timeout_is_served(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry(drip=(40, 0.05))
    image = upstream.add(make_image())
    proxyd = await make_proxyd(config(await start_fake(upstream), read_timeout=READ_TIMEOUT))
    assert len(image.manifest) // 40 * 0.05 > READ_TIMEOUT, "the drip is not slow enough"

    response = await proxyd.get(path_of(image, "manifest"))

    assert response.status == 200
    assert await response.read() == image.manifest
    assert response.headers["Docker-Content-Digest"] == image.digest


async def test_a_manifest_that_stalls_mid_body_is_502_not_500(make_proxyd, start_fake, cache_dir):
    upstream = FakeRegistry(drip=(100, 5.0))  # 100 bytes, then nothing for 5 s
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server, read_timeout=READ_TIMEOUT))

    response = await asyncio.wait_for(proxyd.get(path_of(image, "manifest")), 10)

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "UNAVAILABLE"
    assert host(server) in error["message"]
    await assert_nothing_left(cache_dir)


# -- bodies that are cut or wrong (manifests; blobs are in test_pull) --------------------


async def test_when_a_moved_tags_manifest_is_cut_short_the_old_one_is_served_stale(
    make_proxyd, start_fake, cache_dir
):
    upstream = FakeRegistry()
    old = upstream.add(make_image(layer=b"old" * 100))
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server, "tag_ttl = 0"))
    assert (await proxyd.get(path_of(old, "manifest"))).status == 200
    upstream.images.clear()
    upstream.add(make_image(layer=b"new" * 100))  # the tag moved ...
    upstream.drop_manifests_after = 100  # ... and its new manifest arrives cut short

    response = await proxyd.get(path_of(old, "manifest"))

    assert response.status == 200
    assert response.headers["X-Proxyd-Cache"] == "stale"
    assert await response.read() == old.manifest
    await assert_nothing_left(cache_dir)


async def test_a_truncated_manifest_is_502_not_500(make_proxyd, start_fake, cache_dir):
    upstream = FakeRegistry(drop_manifests_after=100)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server))

    response = await proxyd.get(path_of(image, "manifest"))

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "UNAVAILABLE"
    assert host(server) in error["message"]
    await assert_nothing_left(cache_dir)


@pytest.mark.parametrize("reference", ["tag", "digest"])
async def test_a_corrupt_manifest_is_refused_and_not_stored(
    make_proxyd, start_fake, cache_dir, reference
):
    upstream = FakeRegistry(corrupt_manifests=True)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server))
    ref = image.tag if reference == "tag" else image.digest

    response = await proxyd.get(f"/v2/{image.repository}/manifests/{ref}")

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "DIGEST_INVALID"
    assert image.digest in error["message"]
    assert not (cache_dir / "blobs" / "sha256" / image.digest.split(":")[1]).exists()
    await assert_nothing_left(cache_dir)

    upstream.corrupt_manifests = False
    retry = await proxyd.get(f"/v2/{image.repository}/manifests/{ref}")
    assert retry.status == 200
    assert await retry.read() == image.manifest


# -- redirects ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["manifest", "blob"])
async def test_a_redirect_loop_is_502_promptly(make_proxyd, start_fake, cache_dir, kind):
    upstream = FakeRegistry(redirect_loop=True)
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server))

    response = await asyncio.wait_for(proxyd.get(path_of(image, kind)), 10)

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "UNAVAILABLE"
    assert host(server) in error["message"]
    assert 1 < len(upstream.seen) <= 10, "the redirects were not followed, or not bounded"
    await assert_nothing_left(cache_dir)


async def test_a_redirect_loop_on_a_mirror_falls_back_to_the_upstream(make_proxyd, start_fake):
    upstream, mirror = FakeRegistry(), FakeRegistry(redirect_loop=True)
    image = upstream.add(make_image())
    server, mirror_server = await start_fake(upstream), await start_fake(mirror)
    proxyd = await make_proxyd(config(server, mirror=mirror_server))

    response = await proxyd.get(path_of(image, "blob"))

    assert response.status == 200
    assert await response.read() == body_of(image, "blob")


# -- token servers -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["manifest", "blob"])
async def test_a_token_server_that_is_down_is_502_naming_it(
    make_proxyd, start_fake, cache_dir, kind
):
    upstream = FakeRegistry(bearer_realm=f"{CLOSED_URL}/token")
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    proxyd = await make_proxyd(config(server))

    response = await asyncio.wait_for(proxyd.get(path_of(image, kind)), 10)

    assert response.status == 502
    error = await error_of(response)
    assert error["code"] == "UNAVAILABLE"
    assert "token server" in error["message"]
    assert f"{CLOSED_URL}/token" in error["message"]
    assert host(server) in error["message"]
    await assert_nothing_left(cache_dir)
