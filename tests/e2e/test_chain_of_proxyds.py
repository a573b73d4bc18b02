"""ctr pulls through two proxyds in a chain: ctr -> proxyd A -> proxyd B -> distribution.

containerd asks A with ``?ns=REGISTRY`` (A is its mirror in hosts.toml). A's namespace
for REGISTRY has B as its mirror, and A forwards the ``ns=`` to it, as containerd sends
``ns=`` to every host that is not the registry's own (``RegistryHost.isProxy`` in
core/remotes/docker/registry.go). B's default namespace is another registry (docker.io,
a closed port here), so B finds the image only by reading that ``ns=``.

The image is private: only B holds the credentials for it. A's own fallback to the
registry is refused (A has none), so the pull succeeds only through B.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.helpers import (
    StartProxyd,
    assert_blobs_came_through_proxyd,
    blob_gets,
    upstream_config,
)
from tests.peers.clients import Containerd, write_hosts_toml
from tests.peers.image import PushedImage
from tests.peers.proxyd import Host
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def test_ctr_pulls_through_a_chain_of_proxyds_with_ns_forwarded(
    containerd: Containerd,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    second = start_proxyd(upstream_config(token_registry, default_namespace="docker.io"))
    first = start_proxyd(
        upstream_config(
            token_registry,
            default_namespace="docker.io",
            mirrors=[Host(second.url)],
            credentials=False,
        )
    )
    hosts_dir = tmp_path / "certs.d"
    write_hosts_toml(
        hosts_dir,
        token_registry.host,
        server=token_registry.url,
        mirrors=[(first.url, ("pull", "resolve"))],
    )

    containerd.images_pull(token_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)

    assert containerd.image_target(token_image.ref, namespace=ctr_namespace) == (
        token_image.manifest_digest
    )
    # Both proxyds served every blob, each routing the request to the registry's namespace.
    assert_blobs_came_through_proxyd(first, token_image, token_registry.host)
    assert_blobs_came_through_proxyd(second, token_image, token_registry.host)
    assert {e.get("host") for e in blob_gets(first.access_log())} == {second.host}, (
        first.describe_log()
    )
