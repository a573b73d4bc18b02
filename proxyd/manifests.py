"""What proxyd reads from a manifest's bytes, for pulls and pushes alike: the media
types a client may ask for, the one reader of bodies (held to containerd's
MaxManifestSize while they are read), the media type a body carries, and the answer
a manifest request gets. Pure but for reading an async stream of chunks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from dataclasses import dataclass

from proxyd.errors import ManifestInvalid, ManifestTooLarge
from proxyd.reference import Digest

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (  # what proxyd accepts upstream when the client named nothing
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)
# A Content-Type that names no manifest type: the body's own `mediaType` decides.
_GENERIC_TYPES = ("application/json", "text/plain", "application/octet-stream")


@dataclass
class Manifest:
    """A manifest answer, by digest or by tag, and where it came from."""

    digest: Digest
    media_type: str
    size: int
    body: bytes
    cache: str  # "hit", "miss", "revalidated" (upstream said unchanged) or "stale"
    host: str | None = None
    fresh_until: float | None = None  # a hit from memory: servable as is until then


async def read_manifest(
    chunks: AsyncIterable[bytes] | None, *, length: int | None, limit: int, source: str
) -> bytes:
    """The whole body, at most `limit` bytes: a declared length over it is refused
    before a byte is read, a body that grows past it as soon as it does, so a huge or
    endless manifest costs at most `limit` bytes of memory. `source` says whose it is
    ("from ghcr.io", "pushed") in the error."""
    if length is not None and length > limit:
        raise ManifestTooLarge(f"manifest {source} is {length} bytes; the limit is {limit}")
    body = bytearray()
    if chunks is not None:
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                raise ManifestTooLarge(f"manifest {source} exceeds the limit of {limit} bytes")
    return bytes(body)


def declared_media_type(body: bytes) -> str | None:
    """The `mediaType` a manifest declares in its body (None when it names none);
    ManifestInvalid when the body is not a JSON object."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ManifestInvalid("a manifest must be a JSON object")
    declared = data.get("mediaType")
    return declared if isinstance(declared, str) and declared else None


def served_media_type(content_type: str | None, body: bytes) -> str:
    """The media type of a manifest a registry served: its Content-Type, unless that is
    a generic type, then the body's own, then an OCI image manifest."""
    header = (content_type or "").split(";")[0].strip()
    if header and header not in _GENERIC_TYPES:
        return header
    try:
        declared = declared_media_type(body)
    except ManifestInvalid:
        declared = None
    return declared or header or OCI_MANIFEST
