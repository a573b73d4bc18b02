"""podman, anonymous, with a registries.conf mirror pointing at proxyd.

podman sends the mirror no ``ns``: proxyd serves the registry as its default
namespace.  The repository is private on the token-auth registry, so podman's
fallback to the registry itself would fail: success means proxyd served it.
"""

from __future__ import annotations

import pytest

from tests.e2e.helpers import StartProxyd, blob_gets, digest_of, upstream_config
from tests.peers.clients import Podman, registries_conf_with_mirror
from tests.peers.image import PushedImage
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def test_podman_pulls_through_registries_conf_mirror(
    podman: Podman,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))
    podman.set_registries_conf(registries_conf_with_mirror(token_registry.host, proxyd.host))

    podman.pull(token_image.ref)

    assert podman.image_digest(token_image.ref) == token_image.manifest_digest
    wanted = set(token_image.blob_digests)
    log = proxyd.wait_for_log(
        lambda entries: wanted <= {digest_of(e["path"]) for e in blob_gets(entries)}
    )
    served = {digest_of(e["path"]) for e in blob_gets(log) if e.get("status") == 200}
    assert wanted <= served, proxyd.describe_log()


def test_podman_pulls_docker_schema2_image_through_proxyd(
    podman: Podman,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_docker_image: PushedImage,
) -> None:
    proxyd = start_proxyd(upstream_config(token_registry))
    podman.set_registries_conf(registries_conf_with_mirror(token_registry.host, proxyd.host))

    podman.pull(token_docker_image.ref)

    assert podman.image_digest(token_docker_image.ref) == token_docker_image.manifest_digest
