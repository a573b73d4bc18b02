"""Credentials read from docker's config.json: its `auths` entries as docker writes
them, and the credential helpers it names (`credsStore`, `credHelpers`): small helper
programs written into tmp_path speak docker's protocol (`get`, the server URL on stdin,
JSON on stdout), and record what docker would have sent them."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from proxyd import cli, credentials
from proxyd.credentials import CredentialsError, read_docker_config
from tests.conftest import host, origin
from tests.fakes import FakeRegistry, make_image


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- docker's config.json: auths ----------------------------------------------------------


def auths_config(tmp_path: Path, auths: object) -> Path:
    return write(tmp_path / "config.json", json.dumps({"auths": auths}))


def test_docker_auth_is_base64_user_and_password(tmp_path):
    path = auths_config(tmp_path, {"registry.example": {"auth": b64("alice:open:sesame")}})
    credential = read_docker_config(path)["registry.example"]
    assert (credential.username, credential.password) == ("alice", "open:sesame")


def test_docker_username_and_password_fields_are_read(tmp_path):
    path = auths_config(tmp_path, {"r.example": {"username": "bob", "password": "builder"}})
    credential = read_docker_config(path)["r.example"]
    assert (credential.username, credential.password) == ("bob", "builder")


def test_docker_identity_token_becomes_an_oauth_refresh_token(tmp_path):
    path = auths_config(
        tmp_path, {"r.example": {"auth": b64("<token>:"), "identitytoken": "refresh-me"}}
    )
    credential = read_docker_config(path)["r.example"]
    assert credential.identity_token == "refresh-me"
    assert credential.username == "<token>"
    assert credential.password is None


@pytest.mark.parametrize(
    "key", ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "https://docker.io"]
)
def test_docker_hub_keys_are_credentials_for_registry_1(tmp_path, key):
    path = auths_config(tmp_path, {key: {"auth": b64("alice:pw")}})
    assert list(read_docker_config(path)) == ["registry-1.docker.io"]


def test_url_keys_become_the_host_and_port(tmp_path):
    path = auths_config(tmp_path, {"https://r.example:5000/v2/": {"auth": b64("a:b")}})
    assert list(read_docker_config(path)) == ["r.example:5000"]


def test_entries_that_are_not_objects_are_a_config_error_naming_the_entry(tmp_path):
    path = auths_config(tmp_path, {"r.example": "nonsense", "s.example": {"auth": b64("a:b")}})
    with pytest.raises(CredentialsError, match=r"auths\.r\.example is not an object"):
        read_docker_config(path)


def test_a_docker_config_without_auths_gives_no_credentials(tmp_path):
    path = write(tmp_path / "config.json", '{"credsStore": "desktop"}')
    assert read_docker_config(path) == {}


def test_auth_that_is_not_base64_is_a_config_error_naming_the_entry(tmp_path):
    path = auths_config(tmp_path, {"r.example": {"auth": "not base64"}})
    with pytest.raises(CredentialsError, match=r"auths\.r\.example\.auth"):
        read_docker_config(path)


def test_a_docker_config_that_is_not_json_is_a_config_error(tmp_path):
    path = write(tmp_path / "config.json", "{auths:")
    with pytest.raises(CredentialsError, match="not JSON"):
        read_docker_config(path)


def test_a_missing_docker_config_is_a_config_error(tmp_path):
    with pytest.raises(CredentialsError, match="cannot read docker config"):
        read_docker_config(tmp_path / "missing.json")


def test_auth_with_characters_outside_the_base64_alphabet_is_a_config_error(tmp_path):
    path = auths_config(tmp_path, {"r.example": {"auth": "@@@@"}})
    with pytest.raises(CredentialsError, match=r"auths\.r\.example\.auth"):
        read_docker_config(path)


def test_auth_without_a_colon_is_a_config_error(tmp_path):
    path = auths_config(tmp_path, {"r.example": {"auth": b64("alice")}})
    with pytest.raises(CredentialsError, match=r"auths\.r\.example\.auth"):
        read_docker_config(path)


def test_auth_that_is_not_a_string_is_a_config_error(tmp_path):
    path = auths_config(tmp_path, {"r.example": {"auth": 123}})
    with pytest.raises(CredentialsError, match=r"auths\.r\.example\.auth"):
        read_docker_config(path)


def test_an_entry_field_of_the_wrong_type_is_an_error_naming_the_file_and_field(tmp_path):
    path = auths_config(tmp_path, {"r.example": {"username": 5}})
    with pytest.raises(CredentialsError) as raised:
        read_docker_config(path)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"invalid configuration in {path}:"
    assert lines[1].startswith("  username: ")


@pytest.mark.parametrize("text", ["[]", '"text"', '{"auths": []}'])
def test_a_docker_config_of_the_wrong_shape_is_a_config_error(tmp_path, text):
    path = write(tmp_path / "config.json", text)
    with pytest.raises(CredentialsError, match=re.escape(str(path))):
        read_docker_config(path)


# -- credential helpers -------------------------------------------------------------------


HELPER = """\
#!{python}
import json, sys
assert sys.argv[1:] == ["get"], sys.argv
url = sys.stdin.read()
with open({log!r}, "a") as out:
    out.write(json.dumps(url) + "\\n")
answers = json.loads({answers!r})
if url not in answers:
    print("credentials not found in native keychain")
    sys.exit(1)
print(json.dumps(answers[url]))
"""


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH, for the helpers of one test."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ.get('PATH', '')}")
    return path


def script(bin_dir: Path, name: str, text: str) -> Path:
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(text)
    path.chmod(0o755)
    return path


class Helper:
    """A helper answering `answers[server_url]`, recording each server URL it got."""

    def __init__(self, bin_dir: Path, name: str, answers: dict[str, Any]) -> None:
        self.log = bin_dir / f"{name}.log"
        script(
            bin_dir,
            name,
            HELPER.format(python=sys.executable, log=str(self.log), answers=json.dumps(answers)),
        )

    @property
    def asked(self) -> list[str]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def secret(username: str, value: str, url: str = "") -> dict[str, str]:
    return {"ServerURL": url, "Username": username, "Secret": value}


def docker_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


def test_creds_store_is_asked_for_every_registry_in_auths_with_dockers_server_urls(
    tmp_path, bin_dir
):
    helper = Helper(
        bin_dir,
        "desktop",
        {
            "https://index.docker.io/v1/": secret("hubuser", "hub-pw"),
            "registry.example:5000": secret("alice", "wonderland"),
        },
    )
    path = docker_config(
        tmp_path,
        {
            "auths": {"https://index.docker.io/v1/": {}, "registry.example:5000": {}},
            "credsStore": "desktop",
        },
    )
    found = read_docker_config(path)
    # Exactly what docker writes on the helper's stdin: no newline, Hub as its v1 URL.
    assert helper.asked == ["https://index.docker.io/v1/", "registry.example:5000"]
    hub, other = found["registry-1.docker.io"], found["registry.example:5000"]
    assert (hub.username, hub.password) == ("hubuser", "hub-pw")
    assert (other.username, other.password) == ("alice", "wonderland")
    assert other.identity_token is None


def test_a_token_username_makes_the_secret_an_identity_token(tmp_path, bin_dir):
    Helper(bin_dir, "pass", {"r.example": secret("<token>", "refresh-me")})
    path = docker_config(tmp_path, {"auths": {"r.example": {}}, "credsStore": "pass"})
    credential = read_docker_config(path)["r.example"]
    assert credential.identity_token == "refresh-me"
    assert (credential.username, credential.password) == (None, None)


def test_cred_helpers_name_a_helper_per_registry_and_win_over_the_store(tmp_path, bin_dir):
    store = Helper(bin_dir, "store", {"b.example": secret("bob", "from-store")})
    ecr = Helper(
        bin_dir,
        "ecr-login",
        {"a.example": secret("AWS", "from-ecr"), "c.example": secret("carol", "c")},
    )
    path = docker_config(
        tmp_path,
        {
            "auths": {"a.example": {"auth": b64("file:pw")}, "b.example": {}},
            "credsStore": "store",
            # c.example is named only here: a helper needs no auths entry.
            "credHelpers": {"a.example": "ecr-login", "c.example": "ecr-login"},
        },
    )
    found = read_docker_config(path)
    assert sorted(ecr.asked) == ["a.example", "c.example"]
    assert store.asked == ["b.example"]
    assert (found["a.example"].username, found["a.example"].password) == ("AWS", "from-ecr")
    assert found["b.example"].password == "from-store"
    assert found["c.example"].username == "carol"


def test_cred_helpers_for_docker_hub_get_the_v1_url(tmp_path, bin_dir):
    helper = Helper(bin_dir, "gcloud", {"https://index.docker.io/v1/": secret("u", "p")})
    path = docker_config(tmp_path, {"credHelpers": {"https://index.docker.io/v1/": "gcloud"}})
    assert list(read_docker_config(path)) == ["registry-1.docker.io"]
    assert helper.asked == ["https://index.docker.io/v1/"]


def test_credentials_not_found_is_no_credential_not_an_error(tmp_path, bin_dir):
    helper = Helper(bin_dir, "osxkeychain", {})
    path = docker_config(
        tmp_path,
        {"auths": {"r.example": {"auth": b64("file:pw")}}, "credsStore": "osxkeychain"},
    )
    # As docker: with a store, the store answers for the registry, not the file.
    assert read_docker_config(path) == {}
    assert helper.asked == ["r.example"]


def test_an_empty_helper_name_means_none_and_the_file_entry_counts(tmp_path, bin_dir):
    path = docker_config(
        tmp_path,
        {"auths": {"r.example": {"auth": b64("file:pw")}}, "credHelpers": {"r.example": ""}},
    )
    assert read_docker_config(path)["r.example"].username == "file"


def test_a_helper_missing_from_path_is_a_config_error_naming_it(tmp_path, bin_dir):
    path = docker_config(tmp_path, {"auths": {"r.example": {}}, "credsStore": "nowhere"})
    with pytest.raises(CredentialsError) as caught:
        read_docker_config(path)
    message = str(caught.value)
    assert "docker-credential-nowhere is not on PATH" in message
    assert "credsStore (for r.example)" in message
    assert "install it" in message
    assert str(path) in message


def test_a_failing_helper_is_a_config_error_with_its_output(tmp_path, bin_dir):
    script(
        bin_dir, "broken", "#!/bin/sh\necho 'error getting credentials: dbus down' >&2\nexit 3\n"
    )
    path = docker_config(tmp_path, {"credHelpers": {"r.example": "broken"}})
    with pytest.raises(CredentialsError) as caught:
        read_docker_config(path)
    message = str(caught.value)
    assert "docker-credential-broken get failed for r.example (exit status 3" in message
    assert "dbus down" in message
    assert "credHelpers.r.example" in message


@pytest.mark.parametrize("output", ["not json at all", "[1, 2]", '{"Username": 5, "Secret": "x"}'])
def test_output_that_is_not_the_protocols_json_is_a_config_error(tmp_path, bin_dir, output):
    script(bin_dir, "odd", f"#!/bin/sh\ncat >/dev/null\necho '{output}'\n")
    path = docker_config(tmp_path, {"credHelpers": {"r.example": "odd"}})
    with pytest.raises(CredentialsError, match=r"docker-credential-odd get for r\.example did not"):
        read_docker_config(path)


def test_a_helper_that_hangs_is_stopped_and_is_a_config_error(tmp_path, bin_dir, monkeypatch):
    monkeypatch.setattr(credentials, "HELPER_TIMEOUT", 0.5)
    # The shell's child (sleep) holds stdout open too: it must be stopped with it.
    script(bin_dir, "stuck", "#!/bin/sh\nsleep 60\n")
    path = docker_config(tmp_path, {"credHelpers": {"r.example": "stuck"}})
    started = time.monotonic()
    with pytest.raises(
        CredentialsError, match=r"docker-credential-stuck get did not answer .* 0\.5 s"
    ):
        read_docker_config(path)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"credsStore": 5, "auths": {"r.example": {}}}, "credsStore must be"),
        ({"credHelpers": ["r.example"]}, "credHelpers must map"),
        ({"credHelpers": {"r.example": 1}}, "credHelpers must map"),
        ({"credHelpers": {"r.example": "../../bin/sh"}}, "not a credential helper name"),
    ],
)
def test_malformed_helper_settings_are_config_errors(tmp_path, bin_dir, data, expected):
    with pytest.raises(CredentialsError, match=expected):
        read_docker_config(docker_config(tmp_path, data))


def test_the_default_timeout_is_ten_seconds():
    assert credentials.HELPER_TIMEOUT == 10.0


def test_check_config_shows_a_helpers_credentials(tmp_path, bin_dir, capsys):
    Helper(bin_dir, "ecr-login", {"r.example": secret("AWS", "s3cret-from-helper")})
    path = docker_config(tmp_path, {"credHelpers": {"r.example": "ecr-login"}})
    config = tmp_path / "proxyd.toml"
    config.write_text('[namespaces."r.example"]\nserver = "https://r.example"\n')
    argv = ["check-config", "--config", str(config), "--docker-config", str(path)]
    code = cli.main([*argv, "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr()
    assert code == 0
    assert "https://r.example/v2 (upstream: pull, resolve, push, referrers), credentials" in out.out
    assert "s3cret-from-helper" not in out.out + out.err


def test_check_config_with_a_missing_helper_exits_2(tmp_path, bin_dir, capsys):
    path = docker_config(tmp_path, {"credHelpers": {"r.example": "gone"}})
    code = cli.main(["check-config", "--docker-config", str(path), "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "docker-credential-gone is not on PATH" in err
    assert "Traceback" not in err


async def test_a_pull_uses_the_helpers_credentials(make_proxyd, start_fake, tmp_path, bin_dir):
    upstream = FakeRegistry(basic=("alice", "wonderland"))
    image = upstream.add(make_image())
    server = await start_fake(upstream)
    helper = Helper(bin_dir, "desktop", {host(server): secret("alice", "wonderland")})
    path = docker_config(tmp_path, {"auths": {host(server): {}}, "credsStore": "desktop"})
    proxyd = await make_proxyd(
        "\n".join(
            [
                f'default_namespace = "{host(server)}"',
                f'[namespaces."{host(server)}"]',
                f'server = "{origin(server)}"',
            ]
        ),
        docker_config=path,
    )
    response = await proxyd.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 200
    assert await response.read() == image.manifest
    assert helper.asked == [host(server)]  # once, at load; not per request
