"""proxyd configured the way a containerd host already is: a hosts.toml directory for
the upstream and a docker ``config.json`` for its credentials."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import ALICE_CREDS, StartProxyd, assert_same_image
from tests.peers.clients import Skopeo, write_hosts_toml
from tests.peers.image import BuiltImage, PushedImage, push_image
from tests.peers.proxyd import Namespace, proxyd_config
from tests.peers.registry import Registry
from tests.peers.tokenserver import TokenServer

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


def test_a_hosts_toml_written_for_containerd_2_starts_proxyd_and_is_pulled_through(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_image: PushedImage,
    tmp_path: Path,
) -> None:
    """containerd 2.x keys (dial_timeout, the referrers capability) and a key of some
    later version: proxyd starts, names the unknown key in its log, and pulls."""
    hosts_dir = tmp_path / "certs.d"
    directory = hosts_dir / (token_registry.host.replace(":", "_") + "_")
    directory.mkdir(parents=True)
    hosts_toml = directory / "hosts.toml"
    hosts_toml.write_text(
        f'server = "{token_registry.url}"\n'
        'capabilities = ["pull", "resolve", "push", "referrers"]\n'
        'dial_timeout = "5s"\n'
        "some_later_key = true\n"
    )
    docker_config = tmp_path / "config.json"
    auth = base64.b64encode(ALICE_CREDS.encode()).decode()
    docker_config.write_text(json.dumps({"auths": {token_registry.host: {"auth": auth}}}))
    proxyd = start_proxyd(
        proxyd_config(default_namespace=token_registry.host),
        extra_args=["--hosts-dir", str(hosts_dir), "--docker-config", str(docker_config)],
    )

    pulled = skopeo.pull_to_dir(f"{proxyd.host}/{token_image.path}")

    assert_same_image(pulled, token_image)
    (warning,) = proxyd.wait_for_event("config.unknown_key")
    assert (warning["file"], warning["key"], warning["level"]) == (
        str(hosts_toml),
        "some_later_key",
        "warning",
    )


ROTATING_HELPER = """\
#!{python}
import json, sys
url = sys.stdin.read()
secret = open({secret!r}).read().strip()
print(json.dumps({{"ServerURL": url, "Username": "carol", "Secret": secret}}))
"""


def test_a_rotated_password_is_asked_for_again_when_refused_without_a_restart(
    skopeo: Skopeo,
    start_proxyd: StartProxyd,
    token_registry: Registry,
    token_server: TokenServer,
    image: BuiltImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A docker credential helper's password changes at the registry's token server
    and in the helper's store, as a rotation does: proxyd, still holding the old one,
    is refused a new repository's token, asks the helper again and pulls it anyway."""
    users = token_server.policy.users
    assert isinstance(users, dict)
    users["carol"] = "rotate-1-a7f3"
    try:
        one = push_image(skopeo, image, token_registry.host, "rotate/one", creds=ALICE_CREDS)
        two = push_image(skopeo, image, token_registry.host, "rotate/two", creds=ALICE_CREDS)
        bin_dir, secret = tmp_path / "bin", tmp_path / "secret"
        bin_dir.mkdir()
        secret.write_text("rotate-1-a7f3")
        helper = bin_dir / "docker-credential-rotating"
        helper.write_text(ROTATING_HELPER.format(python=sys.executable, secret=str(secret)))
        helper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
        docker_config = tmp_path / "config.json"
        docker_config.write_text(
            json.dumps({"auths": {token_registry.host: {}}, "credsStore": "rotating"})
        )
        proxyd = start_proxyd(
            proxyd_config(
                default_namespace=token_registry.host,
                namespaces=[Namespace(token_registry.host, token_registry.url)],
            ),
            extra_args=["--docker-config", str(docker_config)],
        )
        assert_same_image(skopeo.pull_to_dir(f"{proxyd.host}/{one.path}"), one)

        users["carol"] = "rotate-2-c91e"
        secret.write_text("rotate-2-c91e")
        assert_same_image(skopeo.pull_to_dir(f"{proxyd.host}/{two.path}"), two)

        [reloaded] = proxyd.wait_for_event("config.reloaded")
        assert reloaded["credentials_changed"] == [token_registry.host]
        refused = [e["host"] for e in proxyd.logs() if e.get("event") == "credentials.refused"]
        assert refused == [token_registry.host]
        assert "rotate-2-c91e" not in proxyd.stderr_text()
    finally:
        users.pop("carol", None)
