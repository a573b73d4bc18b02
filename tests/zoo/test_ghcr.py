"""skopeo pulls ghcr.io's images through proxyd (tests/zoo/ghcr.py): an anonymous token
for a public image from the registry's own realm, kept as the token spec says when ghcr
states no lifetime, and blobs from another host by a SAS URL."""

from __future__ import annotations

import pytest

from tests.conftest import FakeClock, oci_code
from tests.peers.clients import PulledImage
from tests.peers.image import BuiltImage
from tests.zoo.ghcr import Ghcr

pytestmark = pytest.mark.peers


def ghcr_config(ghcr: Ghcr) -> str:
    """ghcr.io as a namespace of its own, named by clients as a path prefix."""
    return "\n".join(['[namespaces."ghcr.io"]', f'server = "{ghcr.origin}"'])


def assert_pulled(pulled: PulledImage, image: BuiltImage) -> None:
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.blob_digests == set(image.blob_digests)


async def test_a_public_image_is_pulled_with_an_anonymous_token_and_blobs_from_another_host(
    make_proxyd, ghcr, images, skopeo_through
):
    proxyd = await make_proxyd(ghcr_config(ghcr))

    assert_pulled(await skopeo_through.pull(proxyd, "ghcr.io/org/app:v1"), images.app)

    [asked] = ghcr.tokens.recorded()
    assert asked.query_values("scope") == ["repository:org/app:pull"]
    assert asked.query_values("service") == ["ghcr.io"]
    assert asked.header("Authorization") is None, "anonymous"
    [(token, _grant)] = ghcr.tokens.issued()
    seen = ghcr.recorded()
    assert seen[0].header("Authorization") is None  # the challenge, then the token
    assert all(r.header("Authorization") == f"Bearer {token}" for r in seen[1:])
    blobs = images.app.blob_digests
    assert len(ghcr.recorded("blobs", "GET")) == len(blobs)
    # The SAS signature (with its %2B and %2F) arrived intact, without the token.
    storage = ghcr.storage
    assert sorted(storage.served) == sorted(storage.path_of(d) for d in blobs)
    assert all(r.header("Authorization") is None for r in storage.recorded())


async def test_a_token_without_expires_in_is_kept_the_token_specs_60_seconds(
    make_proxyd, ghcr, images, skopeo_through
):
    """distribution's token spec: "When omitted, this defaults to 60 seconds"."""
    clock = FakeClock()
    proxyd = await make_proxyd(ghcr_config(ghcr), clock=clock)
    await skopeo_through.pull(proxyd, "ghcr.io/org/app:v1")

    clock.advance(30)
    assert_pulled(await skopeo_through.pull(proxyd, "ghcr.io/org/app:v2"), images.other)
    assert len(ghcr.tokens.recorded()) == 1, "the token still held"

    clock.advance(31)  # v1's tag is due; the token has lived out its 60 s
    assert_pulled(await skopeo_through.pull(proxyd, "ghcr.io/org/app:v1"), images.app)
    assert len(ghcr.tokens.recorded()) == 2
    assert ghcr.recorded("manifests", "HEAD")[-1].header("Authorization") == (
        f"Bearer {ghcr.tokens.issued()[-1][0]}"
    )


async def test_a_private_image_is_denied_to_an_anonymous_token(make_proxyd, ghcr):
    proxyd = await make_proxyd(ghcr_config(ghcr))

    response = await proxyd.get("/v2/ghcr.io/org/private/manifests/v1")

    assert response.status == 403
    assert await oci_code(response) == "DENIED"
