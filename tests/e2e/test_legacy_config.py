"""A manifest with a legacy `application/octet-stream` config, pushed to the real
registry, is converted by proxyd when its namespace opts in, and untouched when not."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.e2e.helpers import StartProxyd, upstream_config
from tests.peers import http_request
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers

SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
SCHEMA2_CONFIG = "application/vnd.docker.container.image.v1+json"


def push_legacy_manifest(registry: Registry, repository: str) -> str:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    start = http_request("POST", f"{registry.url}/v2/{repository}/blobs/uploads/")
    assert start.status == 202, start.body
    location = start.header("Location") or ""
    location = location if location.startswith("http") else f"{registry.url}{location}"
    separator = "&" if "?" in location else "?"
    upload = http_request(
        "PUT",
        f"{location}{separator}digest={config_digest}",
        data=config,
        # without it urllib says form-urlencoded, and distribution reads the body as a form
        headers={"Content-Type": "application/octet-stream"},
    )
    assert upload.status == 201, upload.body
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": SCHEMA2,
            "config": {
                "mediaType": "application/octet-stream",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    put = http_request(
        "PUT",
        f"{registry.url}/v2/{repository}/manifests/legacy",
        data=manifest,
        headers={"Content-Type": SCHEMA2},
    )
    assert put.status == 201, put.body
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


@pytest.mark.parametrize("convert", [True, False])
def test_a_legacy_config_is_converted_only_when_the_namespace_opts_in(
    start_proxyd: StartProxyd, plain_registry: Registry, convert: bool
) -> None:
    original = push_legacy_manifest(plain_registry, "old/app")
    config = upstream_config(plain_registry, credentials=False).replace(
        f'server = "{plain_registry.url}"',
        f'server = "{plain_registry.url}"\nconvert_legacy_config = {str(convert).lower()}',
    )
    assert "convert_legacy_config" in config
    proxyd = start_proxyd(config)

    served = proxyd.request("GET", "/v2/old/app/manifests/legacy", headers={"Accept": SCHEMA2})

    assert served.status == 200, served.body
    digest = served.header("Docker-Content-Digest")
    config_type = json.loads(served.body)["config"]["mediaType"]
    if convert:
        assert config_type == SCHEMA2_CONFIG
        assert digest == "sha256:" + hashlib.sha256(served.body).hexdigest() != original
        by_original = proxyd.request(
            "GET", f"/v2/old/app/manifests/{original}", headers={"Accept": SCHEMA2}
        )
        assert "sha256:" + hashlib.sha256(by_original.body).hexdigest() == original
    else:
        assert config_type == "application/octet-stream"
        assert digest == original
