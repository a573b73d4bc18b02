"""containerd, anonymous, with a hosts.toml that makes proxyd a mirror of the registry.

containerd then asks proxyd ``…?ns=127.0.0.1%3APORT`` for the registry's image.  The
image is in a private repository of the token-auth registry: containerd itself has
no credentials, so its only way to get the image is through proxyd (its fallback to
the registry, the hosts.toml ``server``, is refused).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import (
    StartProxyd,
    assert_blobs_came_through_proxyd,
    upstream_config,
)
from tests.peers.clients import Containerd, write_hosts_toml
from tests.peers.image import PushedImage
from tests.peers.proxyd import ProxydProcess
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def _hosts_dir_with_proxyd_mirror(
    tmp_path: Path, registry: Registry, proxyd: ProxydProcess
) -> Path:
    hosts_dir = tmp_path / "certs.d"
    write_hosts_toml(
        hosts_dir,
        registry.host,
        server=registry.url,
        mirrors=[(proxyd.url, ("pull", "resolve"))],
    )
    return hosts_dir


def test_ctr_content_fetch_uses_proxyd_as_mirror(
    containerd: Containerd,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry, default_namespace="docker.io"))
    hosts_dir = _hosts_dir_with_proxyd_mirror(tmp_path, token_registry, proxyd)

    containerd.content_fetch(token_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)

    stored = containerd.content_digests(namespace=ctr_namespace)
    assert {token_image.manifest_digest, *token_image.blob_digests} <= stored
    assert_blobs_came_through_proxyd(proxyd, token_image, token_registry.host)


def test_ctr_images_pull_with_native_snapshotter_through_proxyd(
    containerd: Containerd,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry, default_namespace="docker.io"))
    hosts_dir = _hosts_dir_with_proxyd_mirror(tmp_path, token_registry, proxyd)

    containerd.images_pull(token_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)

    assert containerd.image_target(token_image.ref, namespace=ctr_namespace) == (
        token_image.manifest_digest
    )
    assert_blobs_came_through_proxyd(proxyd, token_image, token_registry.host)


def test_ctr_resolves_tag_through_proxyd_with_head(
    containerd: Containerd,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    """containerd resolves with ``HEAD …/manifests/v1?ns=…`` and trusts the digest header."""
    proxyd = start_proxyd(upstream_config(token_registry, default_namespace="docker.io"))
    hosts_dir = _hosts_dir_with_proxyd_mirror(tmp_path, token_registry, proxyd)

    containerd.content_fetch(token_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)

    log = proxyd.wait_for_log(lambda entries: any(e.get("method") == "HEAD" for e in entries))
    heads = [e for e in log if e.get("method") == "HEAD" and "/manifests/" in str(e.get("path"))]
    assert heads, proxyd.describe_log()
    assert heads[0]["status"] == 200
    assert heads[0]["namespace"] == token_registry.host
