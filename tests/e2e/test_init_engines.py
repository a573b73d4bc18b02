"""`proxyd init ENGINE` writes files the real engine reads, and the engine then pulls
through proxyd.

Each image is in a private repository of the token-auth registry and the engines have
no credentials: the only way to get it is through proxyd, which holds them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.e2e.helpers import (
    PATH_PREFIX_NAMESPACE,
    REPOSITORY,
    StartProxyd,
    assert_blobs_came_through_proxyd,
    upstream_config,
)
from tests.peers.clients import Containerd, Podman
from tests.peers.image import PushedImage
from tests.peers.proxyd import Namespace
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def test_ctr_pulls_through_proxyd_with_the_hosts_toml_proxyd_init_wrote(
    containerd: Containerd,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    ctr_namespace: str,
    tmp_path: Path,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry, default_namespace="docker.io"))
    hosts_dir = tmp_path / "certs.d"

    proxyd.cli("init", "containerd", "--dir", str(hosts_dir))

    # containerd looks for host:port as `host_port_` first; that is what proxyd writes.
    host, _, port = token_registry.host.rpartition(":")
    written = tomllib.loads((hosts_dir / f"{host}_{port}_" / "hosts.toml").read_text())
    assert written["server"] == token_registry.url
    assert written["host"] == {proxyd.url: {"capabilities": ["pull", "resolve"]}}

    containerd.images_pull(token_image.ref, hosts_dir=hosts_dir, namespace=ctr_namespace)

    assert containerd.image_target(token_image.ref, namespace=ctr_namespace) == (
        token_image.manifest_digest
    )
    assert_blobs_came_through_proxyd(proxyd, token_image, token_registry.host)


def test_podman_pulls_through_proxyd_with_the_registries_conf_proxyd_init_wrote(
    podman: Podman,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    """The default namespace is mirrored at proxyd's root, another namespace under its
    name as a path prefix; the file podman had before is kept as a backup."""
    config = upstream_config(
        token_registry, extra_namespaces=[Namespace(PATH_PREFIX_NAMESPACE, token_registry.url)]
    )
    proxyd = start_proxyd(config)
    before = podman.registries_conf.read_text()

    done = proxyd.cli("init", "podman", "--file", str(podman.registries_conf))

    assert "updated" in done.stdout, done.describe()
    backups = list(podman.registries_conf.parent.glob("registries.conf.bak-*"))
    assert [b.read_text() for b in backups] == [before]

    podman.pull(token_image.ref)
    assert podman.image_digest(token_image.ref) == token_image.manifest_digest
    assert_blobs_came_through_proxyd(proxyd, token_image)

    prefixed = f"{PATH_PREFIX_NAMESPACE}/{REPOSITORY}:v1"
    podman.pull(prefixed)
    assert podman.image_digest(prefixed) == token_image.manifest_digest
    log = proxyd.wait_for_log(
        lambda entries: any(e.get("namespace") == PATH_PREFIX_NAMESPACE for e in entries)
    )
    routed = [
        e
        for e in log
        if e.get("namespace") == PATH_PREFIX_NAMESPACE and "/manifests/" in str(e.get("path"))
    ]
    assert routed, proxyd.describe_log()
    assert {e["status"] for e in routed} == {200}, proxyd.describe_log()
