"""proxyd with a mirror host in front of the upstream (hosts.toml semantics).

The upstream is the token-auth registry, for which proxyd holds alice's
credentials.  Mirrors are tried first; when one fails (404, 500, 401, no answer
within its ``read_timeout``) proxyd goes on to the upstream, and the upstream's
credentials never reach the mirror.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.e2e.helpers import (
    ALICE,
    StartProxyd,
    assert_same_image,
    blob_gets,
    digest_of,
    upstream_config,
)
from tests.peers.clients import Skopeo
from tests.peers.image import PushedImage
from tests.peers.mirrors import FaultyMirror
from tests.peers.proxyd import Host
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers

MIRROR_READ_TIMEOUT = 1.0


def test_pull_through_registry_mirror_is_used_before_upstream(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    registry_factory: Callable[..., Registry],
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    username, password = ALICE
    mirror = registry_factory(
        "pull_through", remote_url=token_registry.url, username=username, password=password
    )
    proxyd = start_proxyd(upstream_config(token_registry, mirrors=[Host(mirror.url)]))

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert_same_image(pulled, token_image)
    from_mirror = {r.path.rpartition("/")[2] for r in mirror.blob_gets()}
    assert set(token_image.blob_digests) <= from_mirror, (
        "proxyd did not fetch blobs from the mirror"
    )
    log = proxyd.wait_for_log(
        lambda entries: len(blob_gets(entries)) >= len(token_image.blob_digests)
    )
    hosts = {e.get("host") for e in blob_gets(log)}
    assert hosts == {mirror.host}, proxyd.describe_log()


@pytest.fixture(params=["404", "500", "401", "hang"])
def faulty_mirror(request: pytest.FixtureRequest) -> Iterator[FaultyMirror]:
    with FaultyMirror(request.param, hang_seconds=30) as mirror:
        yield mirror


def test_failing_mirror_falls_back_to_upstream_without_its_credentials(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    faulty_mirror: FaultyMirror,
    token_registry: Registry,
    token_image: PushedImage,
) -> None:
    proxyd = start_proxyd(
        upstream_config(
            token_registry,
            mirrors=[Host(faulty_mirror.url, read_timeout=MIRROR_READ_TIMEOUT)],
        )
    )

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert_same_image(pulled, token_image)
    asked = faulty_mirror.recorded()
    assert asked, "proxyd never tried the mirror"
    leaked = [
        (r.method, r.path, r.header("Authorization")) for r in asked if r.header("Authorization")
    ]
    assert not leaked, f"credentials reached the mirror: {leaked}"
    log = proxyd.wait_for_log(
        lambda entries: len(blob_gets(entries)) >= len(token_image.blob_digests)
    )
    served = {digest_of(e["path"]) for e in blob_gets(log) if e.get("status") == 200}
    assert set(token_image.blob_digests) <= served, proxyd.describe_log()
    assert {e.get("host") for e in blob_gets(log)} == {token_registry.host}
