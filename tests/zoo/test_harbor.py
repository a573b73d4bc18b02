"""Harbor's proxy-cache project pulled through proxyd (tests/zoo/harbor.py): Docker Hub's
namespace served by a hosts.toml whose `server` is the project's path with
`override_path`, Harbor's token service asked for the names Harbor uses, and Harbor's
own ways of challenging (a HEAD always, a refused token with Basic)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FakeClock
from tests.peers.clients import PulledImage
from tests.peers.image import BuiltImage
from tests.zoo.harbor import PROXY_PROJECT, ROBOT, Harbor

pytestmark = pytest.mark.peers


def harbor_hosts(harbor: Harbor, tmp_path: Path, *extra: str) -> Path:
    """`certs.d/docker.io/hosts.toml` as for containerd: Harbor's project is the server."""
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "docker.io").mkdir(parents=True)
    lines = [f'server = "{harbor.origin}/v2/{PROXY_PROJECT}"', "override_path = true", *extra]
    (hosts_dir / "docker.io" / "hosts.toml").write_text("\n".join(lines) + "\n")
    return hosts_dir


def harbor_config(harbor: Harbor, tmp_path: Path, *hosts: str, robot: bool) -> str:
    """proxyd reading the hosts directory; `hosts`: more lines of the hosts.toml."""
    lines = [f'hosts_dir = "{harbor_hosts(harbor, tmp_path, *hosts)}"']
    if robot:
        name, secret = ROBOT
        lines += [
            f'[credentials."{harbor.host}"]',
            f'username = "{name}"',
            f'password = "{secret}"',
        ]
    return "\n".join(lines)


def assert_pulled(pulled: PulledImage, image: BuiltImage) -> None:
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.blob_digests == set(image.blob_digests)


async def test_a_private_project_is_pulled_by_a_robot_with_tokens_for_harbors_own_names(
    make_proxyd, harbor, images, skopeo_through, tmp_path
):
    """Each repository costs one token, asked (by GET: Harbor's token service has no
    POST) for the name Harbor serves it under; no request but the very first is refused."""
    proxyd = await make_proxyd(harbor_config(harbor, tmp_path, robot=True))

    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)
    assert_pulled(await skopeo_through.pull(proxyd, "library/busybox:latest"), images.busybox)

    seen = harbor.recorded()
    assert {r.path.split("/")[2] for r in seen} == {PROXY_PROJECT}, "all below the project"
    gets = harbor.tokens.recorded("GET")
    assert [
        [s for s in r.query_values("scope") if s.startswith(f"repository:{PROXY_PROJECT}/")]
        for r in gets
    ] == [
        [f"repository:{PROXY_PROJECT}/library/alpine:pull"],
        [f"repository:{PROXY_PROJECT}/library/busybox:pull"],
    ]
    assert all(r.header("Authorization") for r in gets), "the robot's credentials"
    assert len(harbor.tokens.recorded("POST")) == len(gets), "each POST refused 405 first"
    without_token = [r for r in seen if not (r.header("Authorization") or "").startswith("Bearer")]
    assert len(without_token) == 1, [(r.method, r.path, r.header("Authorization")) for r in seen]


async def test_a_public_project_is_pulled_anonymously_and_a_token_asked_once_harbor_challenges(
    make_proxyd, harbor, images, skopeo_through, tmp_path
):
    """A public project's GETs need nothing; Harbor challenges every HEAD without
    credentials (a tag revalidated), and from then on proxyd holds its challenge: the
    next repository's first request carries a token too, which must name the project."""
    harbor.project(PROXY_PROJECT, public=True)
    clock = FakeClock()
    proxyd = await make_proxyd(harbor_config(harbor, tmp_path, robot=False), clock=clock)
    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)
    assert harbor.tokens.recorded() == [], "no token needed yet"

    clock.advance(61)  # alpine's tag is due: revalidated by HEAD, which Harbor challenges
    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)
    assert_pulled(await skopeo_through.pull(proxyd, "library/busybox:latest"), images.busybox)

    asked = harbor.tokens.recorded()
    assert [
        [s for s in r.query_values("scope") if s.startswith(f"repository:{PROXY_PROJECT}/")]
        for r in asked
    ] == [
        [f"repository:{PROXY_PROJECT}/library/alpine:pull"],
        [f"repository:{PROXY_PROJECT}/library/busybox:pull"],
    ]
    assert all(r.header("Authorization") is None for r in asked), "anonymous"


async def test_a_hosts_toml_written_for_containerd_2_with_dial_timeout_is_read(
    make_proxyd, harbor, images, skopeo_through, tmp_path
):
    """containerd's docs/hosts.md: `dial_timeout = "1s"`, to fall back sooner to the
    next host when a mirror is unreachable."""
    proxyd = await make_proxyd(harbor_config(harbor, tmp_path, 'dial_timeout = "1s"', robot=True))

    assert_pulled(await skopeo_through.pull(proxyd, "library/alpine:3"), images.alpine)
