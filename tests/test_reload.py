"""Credentials and users read again while proxyd serves: a rotated secret or a new
htpasswd user needs no restart, and a read that fails changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxyd.config import load_settings
from proxyd.errors import Unauthorized
from proxyd.inbound import InboundAuth
from proxyd.reload import REFUSED_PAUSE, Reloader
from proxyd.runtime import RuntimeConfig, build_runtime
from tests.conftest import FakeClock, host, origin, until
from tests.fakes import FakeRegistry, make_image
from tests.test_inbound import basic, write_htpasswd

HOST = "registry.example"

# Answers with the secret in a file the test rewrites; "fail" makes it fail as a
# locked keychain would.
ROTATING = """\
#!{python}
import json, sys
url = sys.stdin.read()
secret = open({secret!r}).read().strip()
if secret == "fail":
    print("the keychain is locked", file=sys.stderr)
    sys.exit(3)
print(json.dumps({{"ServerURL": url, "Username": "carol", "Secret": secret}}))
"""


@pytest.fixture
def secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file `docker-credential-rotating` answers from (first on PATH)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = tmp_path / "secret"
    path.write_text("pw-one-a7f3")
    helper = bin_dir / "docker-credential-rotating"
    helper.write_text(ROTATING.format(python=sys.executable, secret=str(path)))
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return path


def registry_with_helper(tmp_path: Path, *extra: str) -> RuntimeConfig:
    docker_config = tmp_path / "config.json"
    docker_config.write_text(json.dumps({"auths": {HOST: {}}, "credsStore": "rotating"}))
    config = tmp_path / "proxyd.toml"
    config.write_text("\n".join([f'docker_config = "{docker_config}"', *extra]))
    return build_runtime(load_settings(config, cache_dir=tmp_path / "cache"))


def password(registry: RuntimeConfig) -> str | None:
    credential = registry.credential_for(HOST)
    return credential.password if credential else None


async def test_a_reload_asks_the_helper_again_and_uses_its_new_answer(tmp_path, secret):
    registry = registry_with_helper(tmp_path)
    assert password(registry) == "pw-one-a7f3"
    secret.write_text("pw-two-c91e")
    with capture_logs() as logs:
        assert await Reloader(registry, interval=0).reload(users=False)
    assert password(registry) == "pw-two-c91e"
    [event] = [e for e in logs if e["event"] == "config.reloaded"]
    assert event["credentials_changed"] == [HOST]
    assert "pw-two-c91e" not in repr(logs)  # hosts are logged, never secrets


async def test_a_reload_that_fails_keeps_the_credentials_proxyd_had(tmp_path, secret):
    registry = registry_with_helper(tmp_path)
    secret.write_text("fail")
    with capture_logs() as logs:
        assert not await Reloader(registry, interval=0).reload(users=False)
    assert password(registry) == "pw-one-a7f3"
    [event] = [e for e in logs if e["event"] == "config.reload_failed"]
    assert "docker-credential-rotating get failed" in event["error"]


async def test_credentials_are_read_again_every_credential_refresh_seconds(tmp_path, secret):
    registry = registry_with_helper(tmp_path, "credential_refresh = 0.05")
    reloader = Reloader(registry, interval=registry.settings.credential_refresh)
    reloader.start()
    try:
        secret.write_text("pw-two-c91e")
        await until(lambda: password(registry) == "pw-two-c91e")
        assert password(registry) == "pw-two-c91e"
    finally:
        await reloader.stop()


def test_without_a_docker_config_nothing_is_read_on_a_timer(tmp_path):
    config = tmp_path / "proxyd.toml"
    config.write_text("credential_refresh = 5")
    registry = build_runtime(load_settings(config, cache_dir=tmp_path / "cache"))
    assert Reloader(registry, interval=5).interval == 0


async def test_sighup_reads_the_htpasswd_file_again(tmp_path):
    """reload_now is what SIGHUP calls: a user added since counts, a user removed
    does not, even one whose check was remembered."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    config = tmp_path / "proxyd.toml"
    config.write_text(f'htpasswd = "{htpasswd}"\nauth_required = "all"')
    registry = build_runtime(load_settings(config, cache_dir=tmp_path / "cache"))
    assert registry.inbound_users is not None
    auth = InboundAuth(registry.inbound_users, "all")
    alice = basic("alice", "wonderland")["Authorization"]
    bob = basic("bob", "builder")["Authorization"]
    assert await auth.authenticate("GET", "/v2/", alice) == "alice"  # now remembered

    reloader = Reloader(registry, interval=0)
    reloader.on_users = auth.replace_users
    reloader.start()
    try:
        write_htpasswd(htpasswd, {"bob": "builder"})
        reloader.reload_now()
        await until(lambda: "bob" in (registry.inbound_users or {}))
        assert await auth.authenticate("GET", "/v2/", bob) == "bob"
        with pytest.raises(Unauthorized):
            await auth.authenticate("GET", "/v2/", alice)
    finally:
        await reloader.stop()


async def test_an_htpasswd_file_that_no_longer_parses_keeps_the_users(tmp_path):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    config = tmp_path / "proxyd.toml"
    config.write_text(f'htpasswd = "{htpasswd}"')
    registry = build_runtime(load_settings(config, cache_dir=tmp_path / "cache"))
    htpasswd.write_text("carol:plaintext\n")
    with capture_logs() as logs:
        assert not await Reloader(registry, interval=0).reload(users=True)
    assert list(registry.inbound_users or {}) == ["alice"]
    assert any(e["event"] == "config.reload_failed" for e in logs)


async def test_a_malformed_bcrypt_hash_on_reload_keeps_the_users_proxyd_had(tmp_path):
    """SIGHUP with a hash bcrypt cannot check: the reload fails, and every request goes
    on being checked against the users read before (none of them fails)."""
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "wonderland"})
    config = tmp_path / "proxyd.toml"
    config.write_text(f'htpasswd = "{htpasswd}"')
    registry = build_runtime(load_settings(config, cache_dir=tmp_path / "cache"))
    assert registry.inbound_users is not None
    auth = InboundAuth(registry.inbound_users, "all")
    reloader = Reloader(registry, interval=0)
    reloader.on_users = auth.replace_users
    htpasswd.write_text(htpasswd.read_text() + "carol:$2y$04$" + "a" * 53 + "\n")
    with capture_logs() as logs:
        assert not await reloader.reload(users=True)
    assert list(registry.inbound_users or {}) == ["alice"]
    (event,) = [e for e in logs if e["event"] == "config.reload_failed"]
    assert "the bcrypt hash of 'carol' is malformed" in event["error"]
    alice = basic("alice", "wonderland")["Authorization"]
    assert await auth.authenticate("GET", "/v2/", alice) == "alice"


async def test_a_refused_request_is_sent_once_more_with_the_helpers_new_answer(
    make_proxyd, start_fake, tmp_path, secret
):
    """The password rotates at the registry and in the helper's store: the first
    request refused asks the helper again and goes once more, without waiting for
    credential_refresh; the client sees no error."""
    upstream = FakeRegistry(basic=("carol", "pw-one-a7f3"))
    one = upstream.add(make_image("team/one"))
    two = upstream.add(make_image("team/two"))
    three = upstream.add(make_image("team/three"))
    server = await start_fake(upstream)
    docker_config = tmp_path / "config.json"
    docker_config.write_text(json.dumps({"auths": {host(server): {}}, "credsStore": "rotating"}))
    proxyd = await make_proxyd(
        "\n".join(
            [
                f'default_namespace = "{host(server)}"',
                "credential_refresh = 0",
                f'[namespaces."{host(server)}"]',
                f'server = "{origin(server)}"',
            ]
        ),
        docker_config=docker_config,
    )
    assert (await proxyd.get(f"/v2/team/one/manifests/{one.tag}")).status == 200

    upstream.basic = ("carol", "pw-two-c91e")
    secret.write_text("pw-two-c91e")
    answer = await proxyd.get(f"/v2/team/two/manifests/{two.tag}")
    assert answer.status == 200
    assert await answer.read() == two.manifest

    upstream.basic = ("carol", "pw-three-5d20")  # the helper still says pw-two-c91e
    assert (await proxyd.get(f"/v2/team/three/manifests/{three.tag}")).status == 401


async def test_requests_refused_together_share_one_read_at_most_once_a_minute(tmp_path, secret):
    registry = registry_with_helper(tmp_path)
    reloader = Reloader(registry, interval=0)
    secret.write_text("pw-two-c91e")
    with capture_logs() as logs:
        together = await asyncio.gather(*(reloader.refused(HOST) for _ in range(5)))
        later = await reloader.refused(HOST)
    assert together == [True] * 5  # each is worth sending once more
    assert later is False  # within the minute: no read, nothing changed
    assert [e["event"] for e in logs] == ["credentials.refused", "config.reloaded"]


async def test_a_refusal_a_minute_after_the_last_read_reads_again(tmp_path, secret):
    clock = FakeClock()
    registry = registry_with_helper(tmp_path)
    reloader = Reloader(registry, interval=0, clock=clock)
    secret.write_text("pw-two-c91e")
    assert await reloader.refused(HOST)
    secret.write_text("pw-three-5d20")
    clock.advance(REFUSED_PAUSE - 1)
    assert not await reloader.refused(HOST)  # within the minute: not read
    assert password(registry) == "pw-two-c91e"
    clock.advance(1)
    assert await reloader.refused(HOST)
    assert password(registry) == "pw-three-5d20"
