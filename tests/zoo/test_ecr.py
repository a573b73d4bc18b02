"""ECR pulled through proxyd (tests/zoo/ecr.py): Basic auth with the password a
credential helper hands out, layers from S3 that must not see it, and a password that
expires after 12 hours, which ECR refuses 403 rather than 401."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.clients import PulledImage
from tests.peers.image import BuiltImage
from tests.zoo.ecr import Ecr

NAMESPACE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


def ecr_config(ecr: Ecr, tmp_path: Path) -> str:
    """The helper asked at start and after a refusal only (no timer), so what a refusal
    does is all that can read the rotated password."""
    docker_config = ecr.docker_config(tmp_path / "docker-config.json")
    return "\n".join(
        [
            f'docker_config = "{docker_config}"',
            "credential_refresh = 0",
            f'[namespaces."{NAMESPACE}"]',
            f'server = "{ecr.origin}"',
        ]
    )


def assert_pulled(pulled: PulledImage, image: BuiltImage) -> None:
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.blob_digests == set(image.blob_digests)


@pytest.mark.peers
async def test_ecr_is_pulled_with_the_helpers_password_and_s3_never_sees_it(
    make_proxyd, ecr, images, skopeo_through, tmp_path
):
    proxyd = await make_proxyd(ecr_config(ecr, tmp_path))
    [password] = ecr.valid

    assert_pulled(await skopeo_through.pull(proxyd, f"{NAMESPACE}/team/app:v1"), images.app)

    assert ecr.helper_asked() == [ecr.host]
    sent = [ecr.password_sent(r.header("Authorization")) for r in ecr.recorded()]
    assert sent[0] is None  # the challenge, then the password each time
    assert sent[1:] == [password] * (len(sent) - 1)
    assert len(ecr.storage.served) == len(images.app.blob_digests)
    assert all(r.header("Authorization") is None for r in ecr.storage.recorded())


async def test_a_password_refused_as_expired_is_read_again_and_the_request_sent_once_more(
    make_proxyd, ecr, images, tmp_path
):
    """ECR answers an expired password 403 DENIED, not 401: proxyd asks the helper again
    then too, and the client sees no error."""
    proxyd = await make_proxyd(ecr_config(ecr, tmp_path))
    [first] = ecr.valid
    assert (await proxyd.get(f"/v2/{NAMESPACE}/team/app/manifests/v1")).status == 200
    second = ecr.rotate()

    response = await proxyd.get(f"/v2/{NAMESPACE}/team/other/manifests/v1")

    assert response.status == 200, await response.text()
    assert await response.read() == images.other.manifest
    assert ecr.helper_asked() == [ecr.host, ecr.host]
    sent = [ecr.password_sent(r.header("Authorization")) for r in ecr.recorded("manifests")]
    assert sent[-2:] == [first, second]  # refused once, then the rotated one


@pytest.mark.peers
async def test_pulls_go_on_across_a_password_rotation_without_a_restart(
    make_proxyd, ecr, images, skopeo_through, tmp_path
):
    proxyd = await make_proxyd(ecr_config(ecr, tmp_path))
    assert_pulled(await skopeo_through.pull(proxyd, f"{NAMESPACE}/team/app:v1"), images.app)
    second = ecr.rotate()
    rotated_at = len(ecr.recorded())

    assert_pulled(await skopeo_through.pull(proxyd, f"{NAMESPACE}/team/other:v1"), images.other)

    sent = [ecr.password_sent(r.header("Authorization")) for r in ecr.recorded()[rotated_at:]]
    assert sent[0] in ecr.expired, "the first request after the rotation was refused"
    assert sent[1:] == [second] * (len(sent) - 1), "and every one after had the new password"
