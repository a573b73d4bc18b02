"""containerd's `ConvertManifest`: an image manifest whose config has the legacy media
type `application/octet-stream` gets the Docker schema2 config media type, so engines
that refuse the legacy type can run old images. Pure; opt-in per namespace."""

from __future__ import annotations

import json

LEGACY_CONFIG_MEDIA_TYPE = "application/octet-stream"
SCHEMA2_CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
CONVERTIBLE = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)


def convert_legacy_config(body: bytes, media_type: str) -> bytes | None:
    """The converted manifest, or None when there is nothing to convert (manifest
    lists and indexes are never touched)."""
    if media_type not in CONVERTIBLE:
        return None
    try:
        manifest = json.loads(body)
    except ValueError:
        return None
    config = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(config, dict) or config.get("mediaType") != LEGACY_CONFIG_MEDIA_TYPE:
        return None
    config["mediaType"] = SCHEMA2_CONFIG_MEDIA_TYPE
    return json.dumps(manifest, indent=3).encode()  # containerd marshals with 3 spaces
