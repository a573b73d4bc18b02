"""What the workloads pull: an image of random layers and single large random blobs.

The image is built as an OCI layout (gzip'd tar layers of random bytes, so they do not
compress and their sizes are what the profile says) and pushed byte for byte with the
harness's skopeo. Blobs for the blob workloads are pushed with the registry's upload
API straight from a file, streamed, so a 1 GiB blob never sits in memory. Random
bytes come from a seeded generator: the same profile gives the same digests.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.peers.clients import Skopeo
from tests.peers.image import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    BuiltImage,
    host_architecture,
    push_image,
    sha256_digest,
)

MIB = 1024 * 1024
TAG = "v1"
RANDOM_STEP = 64 * MIB


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _layer(rng: random.Random, index: int, size: int) -> bytes:
    """A gzip'd tar with one file of ``size`` random bytes (level 1: they do not shrink)."""
    # In steps: randbytes of 256 MiB at once overflows a C int. The steps are whole
    # 32-bit words of the generator, so the bytes are those of one call.
    payload = b"".join(
        rng.randbytes(min(RANDOM_STEP, size - at)) for at in range(0, size, RANDOM_STEP)
    )
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(f"bench/layer-{index}.bin")
        info.size, info.mtime, info.mode = size, 0, 0o644
        tar.addfile(info, io.BytesIO(payload))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=1) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def build_image(layout: Path, layer_sizes: list[int], *, seed: int = 6) -> BuiltImage:
    """An OCI layout at ``layout`` with one layer per size (bytes), tagged ``v1``."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    rng = random.Random(seed)
    layers = [_layer(rng, i, size) for i, size in enumerate(layer_sizes)]
    diff_ids = [sha256_digest(gzip.decompress(layer)) for layer in layers]
    config = _canonical(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {"Labels": {"proxyd.bench.seed": str(seed)}},
        }
    )
    config_digest = put(config)
    layer_digests = [put(layer) for layer in layers]
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZIP, "digest": d, "size": len(layer)}
                for d, layer in zip(layer_digests, layers, strict=True)
            ],
        }
    )
    manifest_digest = put(manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": TAG},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))
    return BuiltImage(
        layout=layout,
        tag=TAG,
        media="oci",
        manifest=manifest,
        manifest_media_type=OCI_MANIFEST,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=tuple(layer_digests),
    )


def push(skopeo: Skopeo, image: BuiltImage, host: str, repository: str, creds: str | None) -> None:
    push_image(skopeo, image, host, repository, creds=creds)


def random_file(path: Path, size: int, *, seed: int) -> Blob:
    """Write ``size`` random bytes to ``path`` in 1 MiB steps and return its digest."""
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            chunk = rng.randbytes(min(MIB, left))
            out.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return Blob(f"sha256:{digest.hexdigest()}", size)


def upload_blob(registry_url: str, repository: str, path: Path, blob: Blob) -> None:
    """Monolithic upload (POST, then PUT of the whole file, streamed)."""
    asyncio.run(_upload(registry_url, repository, path, blob))


async def _upload(registry_url: str, repository: str, path: Path, blob: Blob) -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{registry_url}/v2/{repository}/blobs/uploads/") as started:
            if started.status != 202:
                raise RuntimeError(f"upload start: {started.status} {await started.text()}")
            location = started.headers["Location"]
        sep = "&" if "?" in location else "?"
        url = location if location.startswith("http") else registry_url + location
        with path.open("rb") as body:
            async with session.put(
                f"{url}{sep}digest={blob.digest}",
                data=body,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(blob.size),
                },
            ) as done:
                if done.status != 201:
                    raise RuntimeError(
                        f"upload of {blob.digest}: {done.status} {await done.text()}"
                    )


def make_blob(workdir: Path, registry_url: str, repository: str, size: int, *, seed: int) -> Blob:
    """A random blob of ``size`` bytes in ``repository``; the local file is removed."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"blob-{seed}-{size}.bin"
    blob = random_file(path, size, seed=seed)
    try:
        upload_blob(registry_url, repository, path, blob)
    finally:
        path.unlink(missing_ok=True)
    return blob
