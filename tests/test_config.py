"""Settings precedence (flags, PROXYD_* environment, TOML file, defaults), the layered
registry of host chains and credentials, and `proxyd check-config`. (Reading docker's
config.json itself is tests/test_credentials.py's.)"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from proxyd.cli import main
from proxyd.config import ConfigError, default_cache_dir, load_settings
from proxyd.credentials import Credential, CredentialsError, read_docker_config
from proxyd.runtime import build_runtime, check_upstream_tls


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The developer's own PROXYD_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("PROXYD_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def config_file(tmp_path):
    return write(
        tmp_path / "proxyd.toml",
        'listen = "0.0.0.0:6000"\n'
        'cache_dir = "/srv/proxyd-file"\n'
        'default_namespace = "ghcr.io"\n'
        '[namespaces."ghcr.io"]\n'
        'server = "https://ghcr.io"\n',
    )


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- precedence ---------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_given():
    settings = load_settings(None)
    assert settings.listen == "127.0.0.1:5000"
    assert settings.cache_dir == default_cache_dir()
    assert settings.default_namespace == "docker.io"
    assert settings.allow_unconfigured_namespaces is False


def test_the_file_wins_over_the_defaults(config_file):
    settings = load_settings(config_file)
    assert settings.listen == "0.0.0.0:6000"
    assert settings.cache_dir == Path("/srv/proxyd-file")
    assert settings.default_namespace == "ghcr.io"


def test_the_environment_wins_over_the_file(config_file, monkeypatch):
    monkeypatch.setenv("PROXYD_LISTEN", "10.0.0.1:7000")
    monkeypatch.setenv("PROXYD_CACHE_DIR", "/srv/proxyd-env")
    settings = load_settings(config_file)
    assert settings.listen == "10.0.0.1:7000"
    assert settings.cache_dir == Path("/srv/proxyd-env")
    assert settings.default_namespace == "ghcr.io"  # not in the environment: the file's


def test_flags_win_over_the_environment(config_file, monkeypatch):
    monkeypatch.setenv("PROXYD_LISTEN", "10.0.0.1:7000")
    monkeypatch.setenv("PROXYD_DEFAULT_NAMESPACE", "quay.io")
    settings = load_settings(config_file, listen="[::1]:8000", default_namespace=None)
    assert settings.listen == "[::1]:8000"
    assert settings.default_namespace == "quay.io"  # a flag not given leaves the env's


def test_environment_variable_names_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("proxyd_listen", "10.0.0.2:7000")
    assert load_settings(None).listen == "10.0.0.2:7000"


def test_boolean_settings_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("PROXYD_ALLOW_UNCONFIGURED_NAMESPACES", "true")
    assert load_settings(None).allow_unconfigured_namespaces is True


def test_log_level_is_accepted_in_any_case():
    assert load_settings(None, log_level="DEBUG").log_level == "debug"


# -- invalid settings ---------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["nope", "host:", "host:99999", ":x", "127.0.0.1"])
def test_an_invalid_listen_flag_is_a_config_error_naming_listen(listen):
    with pytest.raises(ConfigError, match="listen"):
        load_settings(None, listen=listen)


def test_an_invalid_environment_value_is_a_config_error_naming_the_key(monkeypatch):
    monkeypatch.setenv("PROXYD_MAX_MANIFEST_SIZE", "a lot")
    with pytest.raises(ConfigError, match="max_manifest_size"):
        load_settings(None)


def test_an_invalid_file_value_is_a_config_error_naming_the_key_and_the_file(tmp_path):
    path = write(tmp_path / "proxyd.toml", 'log_level = "loud"\n')
    with pytest.raises(ConfigError, match="log_level") as raised:
        load_settings(path)
    assert str(path) in str(raised.value)


def test_an_unknown_key_in_the_file_is_a_config_error_naming_it(tmp_path):
    path = write(tmp_path / "proxyd.toml", 'lsiten = "127.0.0.1:5000"\n')
    with pytest.raises(ConfigError, match="lsiten"):
        load_settings(path)


def test_a_namespace_that_is_no_host_name_is_a_config_error(tmp_path):
    path = write(tmp_path / "proxyd.toml", '[namespaces."not a host"]\n')
    with pytest.raises(ConfigError, match="'not a host' is not a registry host name"):
        load_settings(path)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    path = write(tmp_path / "proxyd.toml", "listen = \n")
    with pytest.raises(ConfigError, match="invalid TOML") as raised:
        load_settings(path)
    assert str(path) in str(raised.value)


def test_a_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")


def test_an_unknown_capability_in_the_file_is_a_config_error_once_chains_are_built(tmp_path):
    path = write(
        tmp_path / "proxyd.toml",
        '[namespaces."docker.io".host."https://m.example"]\ncapabilities = ["fly"]\n',
    )
    with pytest.raises(ConfigError, match="unknown capability 'fly'"):
        build_runtime(load_settings(path))


# -- secrets stay secret ------------------------------------------------------------------


def test_credential_repr_never_shows_a_secret(tmp_path):
    credential = Credential(
        username="alice",
        password="s3cret-pw",
        identity_token="s3cret-refresh",
        registry_token="s3cret-bearer",
    )
    path = write(
        tmp_path / "proxyd.toml",
        '[credentials."r.example"]\nusername = "alice"\npassword = "s3cret-pw"\n',
    )
    settings = load_settings(path)
    for text in (repr(credential), str(credential), f"{credential!r}", repr(settings)):
        assert "s3cret" not in text
    assert "alice" in repr(credential)


# -- the layered registry -----------------------------------------------------------------


def docker_config(tmp_path: Path, auths: object) -> Path:
    return write(tmp_path / "config.json", json.dumps({"auths": auths}))


@pytest.fixture
def hosts_dir(tmp_path):
    root = tmp_path / "certs.d"
    write(root / "ghcr.io" / "hosts.toml", '[host."https://ghcr-mirror.example"]\n')
    write(root / "quay.io" / "hosts.toml", '[host."https://quay-mirror.example"]\n')
    return root


def test_built_in_docker_hub_is_present_without_any_configuration():
    registry = build_runtime(load_settings(None))
    namespace = registry.namespace("docker.io")
    assert namespace is not None
    assert namespace.source == "built-in"
    assert [h.origin for h in namespace.hosts] == ["https://registry-1.docker.io"]


def test_hosts_dir_namespaces_are_loaded_with_their_file_as_source(hosts_dir):
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    namespace = registry.namespace("quay.io")
    assert namespace is not None
    assert [h.origin for h in namespace.hosts] == ["https://quay-mirror.example", "https://quay.io"]
    assert namespace.source == f"{hosts_dir / 'quay.io'}/hosts.toml"


def test_config_file_namespaces_win_over_the_hosts_dir(tmp_path, hosts_dir):
    path = write(
        tmp_path / "proxyd.toml",
        '[namespaces."ghcr.io"]\n[namespaces."ghcr.io".host."https://from-file.example"]\n',
    )
    registry = build_runtime(load_settings(path, hosts_dir=hosts_dir))
    namespace = registry.namespace("ghcr.io")
    assert namespace is not None
    assert namespace.source == "config file"
    assert [h.host for h in namespace.hosts] == ["from-file.example", "ghcr.io"]


def test_relative_paths_in_a_hosts_dir_resolve_against_its_namespace_directory(tmp_path):
    root = tmp_path / "certs.d"
    write(
        root / "quay.io" / "hosts.toml",
        'ca = "ca.crt"\n[host."https://m.example"]\nca = "m.crt"\n',
    )
    registry = build_runtime(load_settings(None, hosts_dir=root))
    namespace = registry.namespace("quay.io")
    assert namespace is not None
    assert [h.ca for h in namespace.hosts] == [
        (str(root / "quay.io" / "m.crt"),),
        (str(root / "quay.io" / "ca.crt"),),
    ]


def test_relative_paths_resolve_against_a_host_port_directory_spelled_with_underscore(
    tmp_path,
):
    root = tmp_path / "certs.d"
    write(root / "r.example_5000" / "hosts.toml", 'ca = "ca.crt"\n')
    registry = build_runtime(
        load_settings(None, hosts_dir=root, default_namespace="r.example:5000")
    )
    namespace = registry.namespace("r.example:5000")
    assert namespace is not None
    assert namespace.hosts[-1].ca == (str(root / "r.example_5000" / "ca.crt"),)
    assert namespace.source == str(root / "r.example_5000" / "hosts.toml")


def test_default_hosts_toml_serves_any_unconfigured_namespace(hosts_dir):
    write(hosts_dir / "_default" / "hosts.toml", '[host."https://any-mirror.example"]\n')
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    namespace = registry.namespace("registry.example.com")
    assert namespace is not None
    assert namespace.source == str(hosts_dir / "_default" / "hosts.toml")
    assert [h.origin for h in namespace.hosts] == [
        "https://any-mirror.example",
        "https://registry.example.com",
    ]
    assert registry.namespace("registry.example.com") is namespace  # built once


def test_default_hosts_toml_also_serves_docker_hub_through_registry_1(hosts_dir):
    write(hosts_dir / "_default" / "hosts.toml", '[host."https://any-mirror.example"]\n')
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    namespace = registry.namespace("docker.io")
    assert namespace is not None
    assert [h.host for h in namespace.hosts] == ["any-mirror.example", "registry-1.docker.io"]


def test_relative_paths_in_the_default_hosts_toml_resolve_against_its_directory(hosts_dir):
    write(hosts_dir / "_default" / "hosts.toml", 'ca = "ca.crt"\n')
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    namespace = registry.namespace("registry.example.com")
    assert namespace is not None
    assert namespace.hosts[-1].ca == (str(hosts_dir / "_default" / "ca.crt"),)


def test_a_registrys_directory_of_certificate_files_is_its_namespace_not_the_default(hosts_dir):
    """Docker's certs.d layout, no hosts.toml: containerd finds the directory (before
    `_default`) and reads its certificate files."""
    write(hosts_dir / "_default" / "hosts.toml", '[host."https://any-mirror.example"]\n')
    write(hosts_dir / "registry.example.com" / "ca.crt", "")
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    namespace = registry.namespace("registry.example.com")
    assert namespace is not None
    assert namespace.source == f"{hosts_dir / 'registry.example.com'}/ (certificate files)"
    (server,) = namespace.hosts
    assert server.origin == "https://registry.example.com"
    assert server.ca == (str(hosts_dir / "registry.example.com" / "ca.crt"),)


def test_an_unusable_ca_crt_of_a_certificate_directory_is_a_config_error(hosts_dir):
    write(hosts_dir / "registry.example.com" / "ca.crt", "not a certificate")
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    with pytest.raises(ConfigError, match=r"registry\.example\.com/ca\.crt holds no usable PEM"):
        check_upstream_tls(registry)


def test_a_containerd_2_hosts_toml_with_unknown_keys_starts_and_names_them(hosts_dir, capsys):
    path = write(
        hosts_dir / "r.example" / "hosts.toml",
        'server = "https://r.example"\nsome_future_key = true\n'
        '[host."https://m.example"]\ncapabilities = ["pull", "referrers"]\n'
        'dial_timeout = "5s"\nwhatever = 1\n',
    )
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    assert registry.ignored_keys == [
        (str(path), "some_future_key"),
        (str(path), "host.https://m.example.whatever"),
    ]
    assert main(["check-config", "--hosts-dir", str(hosts_dir)]) == 0
    err = capsys.readouterr().err
    assert f"proxyd: warning: {path}: unknown key 'some_future_key' ignored" in err
    assert f"proxyd: warning: {path}: unknown key 'host.https://m.example.whatever'" in err


def test_an_unconfigured_namespace_is_refused_by_default():
    registry = build_runtime(load_settings(None))
    assert registry.namespace("ghcr.io") is None


def test_allow_unconfigured_namespaces_routes_to_the_registry_host_itself():
    registry = build_runtime(load_settings(None, allow_unconfigured_namespaces=True))
    namespace = registry.namespace("ghcr.io")
    assert namespace is not None
    assert namespace.source == "default host"
    assert [h.origin for h in namespace.hosts] == ["https://ghcr.io"]


@pytest.mark.parametrize("name", ["", "not a host", "../etc", "a/b", "host:port"])
def test_a_name_that_is_no_host_never_becomes_a_namespace(name):
    registry = build_runtime(load_settings(None, allow_unconfigured_namespaces=True))
    assert registry.namespace(name) is None


def test_a_default_namespace_that_is_not_configured_is_a_config_error():
    with pytest.raises(ConfigError, match=r"default_namespace 'ghcr\.io' is not configured"):
        build_runtime(load_settings(None, default_namespace="ghcr.io"))


def test_a_default_namespace_may_come_from_the_hosts_dir(hosts_dir):
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir, default_namespace="ghcr.io"))
    assert registry.settings.default_namespace == "ghcr.io"


def test_a_broken_hosts_dir_is_a_config_error(tmp_path):
    root = tmp_path / "certs.d"
    write(root / "ghcr.io" / "hosts.toml", "server = \n")
    with pytest.raises(ConfigError, match=r"ghcr\.io"):
        build_runtime(load_settings(None, hosts_dir=root))


def test_credentials_in_the_config_file_win_over_docker_config(tmp_path):
    docker = docker_config(
        tmp_path,
        {"r.example": {"auth": b64("docker:pw")}, "s.example": {"auth": b64("docker:pw")}},
    )
    path = write(tmp_path / "proxyd.toml", '[credentials."r.example"]\nusername = "file"\n')
    registry = build_runtime(load_settings(path, docker_config=docker))
    r, s = registry.credential_for("r.example"), registry.credential_for("s.example")
    assert r is not None and r.username == "file"
    assert s is not None and s.username == "docker"
    assert registry.credential_for("t.example") is None


def test_a_docker_config_proxyd_cannot_read_is_a_config_error_with_the_readers_message(
    tmp_path,
):
    docker = write(tmp_path / "config.json", '{"auths": {"r.example": {"auth": "@@@@"}}}')
    with pytest.raises(ConfigError) as raised:
        build_runtime(load_settings(None, docker_config=docker))
    with pytest.raises(CredentialsError) as read:
        read_docker_config(docker)
    assert str(raised.value) == str(read.value)
    assert "auths.r.example.auth is not base64 of user:password" in str(raised.value)


# -- proxyd check-config ------------------------------------------------------------------


def test_check_config_prints_each_namespace_chain_in_order(tmp_path, capsys):
    path = write(
        tmp_path / "proxyd.toml",
        'listen = "127.0.0.1:5055"\n'
        '[namespaces."docker.io"]\n'
        '[namespaces."docker.io".host."https://hub-mirror.example"]\n'
        '[namespaces."ghcr.io"]\n'
        'server = "https://ghcr.io"\n'
        '[credentials."ghcr.io"]\n'
        'username = "alice"\n'
        'password = "s3cret"\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "listen:            127.0.0.1:5055" in out
    assert "namespace docker.io  (from config file)" in out
    assert "1. https://hub-mirror.example/v2 (mirror: pull, resolve, referrers), anonymous" in out
    assert (
        "2. https://registry-1.docker.io/v2 (upstream: pull, resolve, push, referrers), anonymous"
        in out
    )
    assert "namespace ghcr.io  (from config file)" in out
    assert "1. https://ghcr.io/v2 (upstream: pull, resolve, push, referrers), credentials" in out
    assert out.index("namespace docker.io") < out.index("namespace ghcr.io")
    assert "s3cret" not in out


def test_check_config_says_how_other_namespaces_are_served(tmp_path, capsys):
    path = write(tmp_path / "proxyd.toml", "allow_unconfigured_namespaces = true\n")
    assert main(["check-config", "--config", str(path)]) == 0
    assert "any other namespace: its registry host itself" in capsys.readouterr().out


def test_check_config_reads_the_config_named_by_the_environment(tmp_path, capsys, monkeypatch):
    path = write(tmp_path / "proxyd.toml", 'listen = "127.0.0.1:5077"\n')
    monkeypatch.setenv("PROXYD_CONFIG", str(path))
    assert main(["check-config"]) == 0
    assert "127.0.0.1:5077" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('listen = "nowhere"\n', "listen"),
        ("listen = \n", "invalid TOML"),
        ('default_namespace = "ghcr.io"\n', "default_namespace 'ghcr.io' is not configured"),
        ('[namespaces."docker.io".host."https://m.example"]\ncapabilities = ["fly"]\n', "fly"),
    ],
)
def test_check_config_of_an_invalid_config_exits_2_with_a_message_and_no_traceback(
    tmp_path, capsys, text, said
):
    path = write(tmp_path / "proxyd.toml", text)
    assert main(["check-config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("proxyd: ")
    assert said in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_check_config_with_a_malformed_docker_config_exits_2(tmp_path, capsys):
    docker = write(tmp_path / "config.json", "[]")
    path = write(tmp_path / "proxyd.toml", "")
    assert main(["check-config", "--config", str(path), "--docker-config", str(docker)]) == 2
    assert str(docker) in capsys.readouterr().err


def test_the_written_out_default_config_is_the_embedded_default():
    """config/proxyd.toml documents the defaults; loading it must change nothing."""
    written = load_settings(Path(__file__).parents[1] / "config" / "proxyd.toml")
    embedded = load_settings(None)
    assert written.model_dump(exclude={"namespaces"}) == embedded.model_dump(exclude={"namespaces"})
    chains = [
        {name: ns.hosts for name, ns in build_runtime(settings).namespaces.items()}
        for settings in (written, embedded)
    ]
    assert chains[0] == chains[1]


def test_the_readme_settings_reference_is_the_generated_one():
    from proxyd.configdoc import render

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert render() in readme, "README.md is stale: paste `python -m proxyd.configdoc`"


def test_check_config_explains_each_chain_in_words(tmp_path, capsys):
    path = tmp_path / "proxyd.toml"
    path.write_text(
        '[namespaces."docker.io"]\nserver = "https://registry-1.docker.io"\n'
        '[namespaces."docker.io".host."https://mirror.example"]\ncapabilities = ["pull"]\n'
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "by digest are asked of mirror.example, then registry-1.docker.io;" in out
    assert "tags are resolved by registry-1.docker.io, and stay fresh for 60 s." in out


# -- [cluster] ----------------------------------------------------------------------------


def test_without_a_cluster_table_proxyd_is_no_fleet():
    settings = load_settings(None)
    assert settings.cluster is None
    assert build_runtime(settings).peer_secret is None


def test_a_cluster_table_with_its_address_from_the_environment(tmp_path, monkeypatch):
    secret = write(tmp_path / "peer-secret", "0123456789abcdef0123\n")
    path = write(
        tmp_path / "proxyd.toml",
        f'[cluster]\nredis_url = "redis://10.0.0.2:6379/1"\nsecret_file = "{secret}"\nfanout = 2\n',
    )
    monkeypatch.setenv("PROXYD_CLUSTER__ADVERTISE", "http://10.0.0.5:5000/")

    settings = load_settings(path)
    runtime = build_runtime(settings)

    assert settings.cluster is not None
    assert settings.cluster.redis_url == "redis://10.0.0.2:6379/1"
    assert settings.cluster.advertise == "http://10.0.0.5:5000"
    assert (settings.cluster.fanout, settings.cluster.ttl, settings.cluster.timeout) == (2, 5, 1)
    assert runtime.peer_secret is not None
    assert runtime.peer_secret.get_secret_value() == b"0123456789abcdef0123"  # no newline
    assert "0123456789abcdef" not in repr(runtime)


def test_a_cluster_may_come_from_the_environment_alone(tmp_path, monkeypatch):
    secret = write(tmp_path / "peer-secret", "s" * 32)
    monkeypatch.setenv("PROXYD_CLUSTER__ADVERTISE", "http://10.0.0.5:5000")
    monkeypatch.setenv("PROXYD_CLUSTER__SECRET_FILE", str(secret))
    monkeypatch.setenv("PROXYD_CLUSTER__FANOUT", "8")
    cluster = load_settings(None).cluster
    assert cluster is not None and cluster.fanout == 8


def test_a_cluster_needs_its_address_and_secret(tmp_path):
    path = write(tmp_path / "proxyd.toml", "[cluster]\nfanout = 2\n")
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "cluster.advertise: Field required" in str(err.value)
    assert "cluster.secret_file: Field required" in str(err.value)


@pytest.mark.parametrize("advertise", ["10.0.0.5:5000", "ftp://10.0.0.5", "http://n:5000/v2"])
def test_advertise_is_an_http_origin(tmp_path, advertise):
    path = write(
        tmp_path / "proxyd.toml",
        f'[cluster]\nadvertise = "{advertise}"\nsecret_file = "/s"\n',
    )
    with pytest.raises(ConfigError, match=r"cluster\.advertise"):
        load_settings(path)


def test_the_peer_listener_is_host_and_port(tmp_path):
    secret = write(tmp_path / "secret", "s" * 32)
    table = f'[cluster]\nadvertise = "http://10.0.0.5:5001"\nsecret_file = "{secret}"\n'
    good = write(tmp_path / "good.toml", table + 'listen = "0.0.0.0:5001"\n')
    bad = write(tmp_path / "bad.toml", table + 'listen = "10.0.0.5"\n')

    cluster = load_settings(good).cluster
    assert cluster is not None and cluster.listen == "0.0.0.0:5001"
    with pytest.raises(ConfigError, match=r"listen must be HOST:PORT"):
        load_settings(bad)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("short\n", "holds 5 bytes; the fleet's secret needs at least 16"),
        ("short of a header " * 2, "printable ASCII without spaces"),
    ],
)
def test_a_peer_secret_that_cannot_serve_is_a_config_error(tmp_path, content, message):
    secret = tmp_path / "peer-secret"
    if content is not None:
        secret.write_text(content)
    path = write(
        tmp_path / "proxyd.toml",
        f'[cluster]\nadvertise = "http://10.0.0.5:5000"\nsecret_file = "{secret}"\n',
    )
    with pytest.raises(ConfigError, match=r"cluster\.secret_file") as err:
        build_runtime(load_settings(path))
    assert message in str(err.value)
    assert "short" not in str(err.value)  # the secret itself is never said


def test_check_config_says_which_fleet_node_this_is_and_never_the_secrets(tmp_path, capsys):
    secret = write(tmp_path / "peer-secret", "0123456789abcdef0123")
    path = write(
        tmp_path / "proxyd.toml",
        '[cluster]\nredis_url = "redis://:hunter2-password@10.0.0.2:6379/1"\n'
        f'advertise = "http://10.0.0.5:5000"\nsecret_file = "{secret}"\n',
    )
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "fleet:             this node is http://10.0.0.5:5000, coordinating through "
        "redis://10.0.0.2:6379/1, streaming a blob to 4 peers at most" in out
    )
    assert "hunter2" not in out and "0123456789abcdef" not in out
