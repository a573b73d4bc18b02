"""proxyd configured the way a containerd host already is: a hosts.toml directory for
the upstream and a docker ``config.json`` for its credentials."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from tests.e2e.helpers import ALICE_CREDS, StartProxyd, assert_same_image
from tests.peers.clients import Skopeo, write_hosts_toml
from tests.peers.image import PushedImage
from tests.peers.proxyd import proxyd_config
from tests.peers.registry import Registry

pytestmark = pytest.mark.peers


def test_hosts_dir_and_docker_config_are_enough_to_pull(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    tmp_path: Path,
) -> None:
    hosts_dir = tmp_path / "certs.d"
    write_hosts_toml(hosts_dir, token_registry.host, server=token_registry.url)
    docker_config = tmp_path / "config.json"
    auth = base64.b64encode(ALICE_CREDS.encode()).decode()
    docker_config.write_text(json.dumps({"auths": {token_registry.host: {"auth": auth}}}))
    proxyd = start_proxyd(
        proxyd_config(default_namespace=token_registry.host),
        extra_args=["--hosts-dir", str(hosts_dir), "--docker-config", str(docker_config)],
    )

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert_same_image(pulled, token_image)
