"""Small, deterministic container images, built on disk and pushed with skopeo.

``build_image(dir, seed=1)`` writes an OCI image layout: a few layers of random
bytes (gzip'd tar, reproducible byte for byte from the seed), a config and a
manifest, with ``index.json`` naming it by tag.  ``media="docker"`` writes a Docker
schema2 manifest over the same kind of blobs instead, as skopeo's ``dir:`` layout
(skopeo's ``oci:`` transport only reads OCI manifests).  ``push_image`` copies it to
a registry with ``skopeo copy --preserve-digests``, so the digests in ``BuiltImage``
are the digests clients must get back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.peers.clients import Skopeo

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MEDIA_TYPES = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_GZIP),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_GZIP),
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def host_architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


@dataclass(frozen=True)
class BuiltImage:
    """An image layout on disk and the digests a registry must serve for it."""

    layout: Path
    tag: str
    media: Literal["oci", "docker"]
    manifest: bytes
    manifest_media_type: str
    manifest_digest: str
    config_digest: str
    layer_digests: tuple[str, ...]

    @property
    def blob_digests(self) -> tuple[str, ...]:
        """Config first, then layers: every blob the manifest references."""
        return (self.config_digest, *self.layer_digests)

    @property
    def source(self) -> str:
        """The image as a skopeo source reference (``oci:DIR:TAG`` or ``dir:DIR``)."""
        return f"oci:{self.layout}:{self.tag}" if self.media == "oci" else f"dir:{self.layout}"

    def blob(self, digest: str) -> bytes:
        return _blob_path(self.layout, self.media, digest).read_bytes()

    @property
    def size(self) -> int:
        return len(self.manifest) + sum(len(self.blob(d)) for d in self.blob_digests)


def _blob_path(layout: Path, media: str, digest: str) -> Path:
    hexdigest = digest.removeprefix("sha256:")
    return layout / "blobs" / "sha256" / hexdigest if media == "oci" else layout / hexdigest


def _layer(rng: random.Random, index: int, size: int) -> bytes:
    """A gzip'd tar holding one file of random bytes, identical for the same rng state."""
    payload = rng.randbytes(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(f"proxyd-test/layer-{index}.bin")
        info.size = len(payload)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(payload))
    compressed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    return compressed.getvalue()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def build_image(
    layout: Path,
    *,
    seed: int = 1,
    layers: int = 3,
    layer_size: int = 256 * 1024,
    tag: str = "v1",
    media: Literal["oci", "docker"] = "oci",
) -> BuiltImage:
    """Write an image layout to ``layout`` (created) and describe it.

    The same arguments always give the same bytes, hence the same digests.
    """
    manifest_type, config_type, layer_type = MEDIA_TYPES[media]

    def put(data: bytes) -> str:
        digest = sha256_digest(data)
        path = _blob_path(layout, media, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    rng = random.Random(seed)
    layer_blobs = [_layer(rng, i, layer_size) for i in range(layers)]
    layer_digests = [put(blob) for blob in layer_blobs]
    diff_ids = [sha256_digest(gzip.decompress(blob)) for blob in layer_blobs]
    config = _canonical(
        {
            "architecture": host_architecture(),
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"proxyd.test.seed": str(seed)}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [
                {"created": "2024-01-01T00:00:00Z", "created_by": f"proxyd test layer {i}"}
                for i in range(layers)
            ],
        }
    )
    config_digest = put(config)
    manifest = _canonical(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config)},
            "layers": [
                {"mediaType": layer_type, "digest": digest, "size": len(blob)}
                for digest, blob in zip(layer_digests, layer_blobs, strict=True)
            ],
        }
    )
    if media == "docker":
        (layout / "manifest.json").write_bytes(manifest)
        (layout / "version").write_text("Directory Transport Version: 1.1\n")
        return BuiltImage(
            layout=layout,
            tag=tag,
            media=media,
            manifest=manifest,
            manifest_media_type=manifest_type,
            manifest_digest=sha256_digest(manifest),
            config_digest=config_digest,
            layer_digests=tuple(layer_digests),
        )
    manifest_digest = put(manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest_type,
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))
    return BuiltImage(
        layout=layout,
        tag=tag,
        media=media,
        manifest=manifest,
        manifest_media_type=manifest_type,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        layer_digests=tuple(layer_digests),
    )


@dataclass(frozen=True)
class PushedImage:
    """An image as it now sits in a registry."""

    image: BuiltImage
    registry: str  # host:port
    repository: str
    tag: str

    @property
    def ref(self) -> str:
        """``host:port/repo:tag``."""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def path(self) -> str:
        """``repo:tag``, the part after the registry."""
        return f"{self.repository}:{self.tag}"

    @property
    def manifest_digest(self) -> str:
        return self.image.manifest_digest

    @property
    def blob_digests(self) -> tuple[str, ...]:
        return self.image.blob_digests


def push_image(
    skopeo: Skopeo,
    image: BuiltImage,
    registry: str,
    repository: str,
    *,
    tag: str | None = None,
    creds: str | None = None,
) -> PushedImage:
    """Push ``image`` to ``registry`` (host:port) as ``repository:tag``, digests unchanged."""
    pushed = PushedImage(image, registry, repository, tag or image.tag)
    skopeo.push(image.source, pushed.ref, creds=creds)
    return pushed
