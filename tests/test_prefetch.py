"""`proxyd prefetch` warms the store with every platform's blobs, or the chosen ones."""

from __future__ import annotations

import json
from pathlib import Path

from proxyd.config import load_settings
from proxyd.core import open_core
from proxyd.prefetch import Progress, platform_matches, prefetch
from proxyd.reference import Digest
from proxyd.runtime import build_runtime
from proxyd.store import BlobStore
from tests.conftest import host, origin
from tests.fakes import FakeImage, FakeRegistry, digest_of, make_image


def multi_platform(upstream: FakeRegistry) -> tuple[FakeImage, FakeImage]:
    amd64 = upstream.add(make_image(tag="amd64", layer=b"amd64-layer" * 100))
    arm64 = upstream.add(make_image(tag="arm64", layer=b"arm64-layer" * 100))
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": image.digest,
                    "size": len(image.manifest),
                    "platform": {"os": "linux", "architecture": arch},
                }
                for image, arch in ((amd64, "amd64"), (arm64, "arm64"))
            ],
        }
    ).encode()
    upstream.add(FakeImage("team/app", "v1", index, {}))
    return amd64, arm64


async def run(tmp_path: Path, server: object, refs: list[str], platforms: list[str]):
    config = tmp_path / "proxyd.toml"
    config.write_text(
        f'default_namespace = "{host(server)}"\n'
        f'[namespaces."{host(server)}"]\nserver = "{origin(server)}"\n'
    )
    registry = build_runtime(load_settings(config, cache_dir=tmp_path / "cache"))
    async with open_core(registry) as core:
        return await prefetch(
            core.resolver, registry, refs, platforms=platforms, progress=Progress()
        )


def stored(tmp_path: Path, image: FakeImage) -> bool:
    store = BlobStore(tmp_path / "cache")
    return store.size(Digest.parse(image.layer)) is not None


async def test_every_platform_is_fetched_by_default(tmp_path, start_fake):
    upstream = FakeRegistry()
    amd64, arm64 = multi_platform(upstream)
    summary = await run(tmp_path, await start_fake(upstream), ["team/app:v1"], [])
    assert summary.failures == []
    # both platforms share their config blob: fetched once, then found in the store
    assert (summary.images, summary.manifests) == (1, 3)
    assert (summary.blobs_fetched, summary.blobs_cached) == (3, 1)
    assert stored(tmp_path, amd64) and stored(tmp_path, arm64)
    distinct = {d: b for i in (amd64, arm64) for d, b in i.blobs.items()}
    assert summary.bytes_fetched == sum(len(b) for b in distinct.values())


async def test_only_the_chosen_platform_is_fetched(tmp_path, start_fake):
    upstream = FakeRegistry()
    amd64, arm64 = multi_platform(upstream)
    summary = await run(tmp_path, await start_fake(upstream), ["team/app:v1"], ["linux/arm64"])
    assert stored(tmp_path, arm64) and not stored(tmp_path, amd64)
    assert summary.blobs_fetched == 2


async def test_a_second_prefetch_finds_everything_cached(tmp_path, start_fake):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    await run(tmp_path, server, ["team/app:v1"], [])
    again = await run(tmp_path, server, ["team/app:v1"], [])
    assert (again.blobs_fetched, again.blobs_cached) == (0, len(image.blobs))


async def test_unknown_images_and_namespaces_are_reported_not_raised(tmp_path, start_fake):
    upstream = FakeRegistry()
    server = await start_fake(upstream)
    summary = await run(tmp_path, server, ["team/nope:v1", "elsewhere.example/a/b:1", "Bad"], [])
    assert summary.images == 0
    assert len(summary.failures) == 3
    assert "not configured" in summary.failures[1]


def test_platforms_match_by_os_architecture_and_variant():
    arm = {"platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    assert platform_matches(arm, ["linux/arm64"])
    assert platform_matches(arm, ["linux/arm64/v8"])
    assert not platform_matches(arm, ["linux/amd64"])
    assert platform_matches(arm, [])
    assert digest_of(b"x").startswith("sha256:")
