"""proxyd serving HTTPS itself (`tls_cert`, `tls_key`, `tls_client_ca`): the settings
checked at load, and the daemon run as a subprocess with certificates from a
throw-away CA (trustme), talked to over real TLS."""

from __future__ import annotations

import json
import ssl
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from proxyd import cli, engines, tls
from proxyd.config import ConfigError, load_settings
from proxyd.runtime import build_runtime
from tests.peers.proxyd import ProxydProcess, https_status, proxyd_config


@dataclass
class Certs:
    ca: trustme.CA
    ca_pem: Path
    cert: Path
    key: Path
    client_pem: Path
    client_key: Path
    other_ca_pem: Path

    def client(self, *, with_certificate: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_pem))
        if with_certificate:
            context.load_cert_chain(self.client_pem, self.client_key)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client.example")
    found = Certs(
        ca,
        tmp_path / "ca.pem",
        tmp_path / "proxyd.pem",
        tmp_path / "proxyd.key",
        tmp_path / "client.pem",
        tmp_path / "client.key",
        tmp_path / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(found.ca_pem)
    server.cert_chain_pems[0].write_to_path(found.cert)
    server.private_key_pem.write_to_path(found.key)
    client.cert_chain_pems[0].write_to_path(found.client_pem)
    client.private_key_pem.write_to_path(found.client_key)
    trustme.CA().cert_pem.write_to_path(found.other_ca_pem)
    return found


def config() -> str:
    return proxyd_config(default_namespace=None)


def get(url: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:  # noqa: S310
        return int(response.status), response.read()


# -- the daemon ------------------------------------------------------------------------


def test_proxyd_serves_https_with_its_certificate(tmp_path, certs: Certs):
    tls_args = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
    with ProxydProcess(config(), tmp_path / "p", extra_args=tls_args, tls=certs.client()) as proxyd:
        assert proxyd.url.startswith("https://127.0.0.1:")
        status, body = get(f"{proxyd.url}/v2/", certs.client())
        assert (status, json.loads(body)) == (200, {})
        assert get(f"{proxyd.url}/healthz", certs.client())[0] == 200
        # Without the CA the client refuses proxyd's certificate.
        untrusting = ssl.create_default_context(cafile=str(certs.other_ca_pem))
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(f"{proxyd.url}/v2/", untrusting)
        # Plain HTTP to the TLS port gets no answer.
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://{proxyd.host}/v2/", timeout=5)
        listening = [e for e in proxyd.logs() if e.get("event") == "listening"]
        assert listening and listening[0]["tls"] is True


def test_proxyd_tls_settings_come_from_the_environment_too(tmp_path, certs: Certs):
    env = {"PROXYD_TLS_CERT": str(certs.cert), "PROXYD_TLS_KEY": str(certs.key)}
    with ProxydProcess(config(), tmp_path / "p", env=env, tls=certs.client()) as proxyd:
        assert https_status(f"{proxyd.url}/v2/", certs.client()) == 200


def test_with_a_client_ca_only_clients_with_a_certificate_are_served(tmp_path, certs: Certs):
    tls_args = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]
    tls_args += ["--tls-client-ca", str(certs.ca_pem)]
    with ProxydProcess(
        config(), tmp_path / "p", extra_args=tls_args, tls=certs.client(with_certificate=True)
    ) as proxyd:
        status, _ = get(f"{proxyd.url}/v2/", certs.client(with_certificate=True))
        assert status == 200
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(f"{proxyd.url}/v2/", certs.client())
        # A certificate from another CA is refused as well.
        stranger = trustme.CA().issue_cert("stranger.example")
        context = certs.client()
        stranger.configure_cert(context)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(f"{proxyd.url}/v2/", context)
        assert proxyd.returncode is None  # refused handshakes do not hurt the daemon
        assert get(f"{proxyd.url}/v2/", certs.client(with_certificate=True))[0] == 200


def test_serve_with_a_missing_key_exits_2_with_a_message(tmp_path, certs: Certs, capsys):
    missing = tmp_path / "none.key"
    argv = ["serve", "--tls-cert", str(certs.cert), "--tls-key", str(missing)]
    assert cli.main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2  # before listening
    err = capsys.readouterr().err
    assert f"cannot serve HTTPS: cannot read tls_key {missing}" in err
    assert "Traceback" not in err


# -- the settings ------------------------------------------------------------------------


def load(tmp_path: Path, **flags: object) -> None:
    build_runtime(load_settings(None, cache_dir=tmp_path / "cache", **flags))


def test_tls_cert_without_a_key_is_a_config_error(tmp_path, certs: Certs):
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load(tmp_path, tls_cert=certs.cert)
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load(tmp_path, tls_key=certs.key)


def test_a_client_ca_without_tls_is_a_config_error(tmp_path, certs: Certs):
    with pytest.raises(ConfigError, match="tls_client_ca needs tls_cert and tls_key"):
        load(tmp_path, tls_client_ca=certs.ca_pem)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"tls_cert": "missing.pem", "tls_key": "proxyd.key"}, r"cannot read tls_cert .*missing"),
        ({"tls_cert": "proxyd.pem", "tls_key": "client.key"}, "key does not belong"),
        ({"tls_cert": "proxyd.key", "tls_key": "proxyd.key"}, "not a PEM certificate and key"),
        (
            {"tls_cert": "proxyd.pem", "tls_key": "proxyd.key", "tls_client_ca": "nope.pem"},
            r"cannot read tls_client_ca .*nope\.pem",
        ),
    ],
)
def test_unusable_tls_files_are_a_config_error(tmp_path, certs: Certs, flags, expected):
    with pytest.raises(ConfigError, match=f"cannot serve HTTPS: .*{expected}"):
        load(tmp_path, **{k: tmp_path / v for k, v in flags.items()})


def test_tls_settings_in_the_config_file(tmp_path, certs: Certs, capsys):
    path = tmp_path / "proxyd.toml"
    path.write_text(
        f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\ntls_client_ca = "{certs.ca_pem}"\n'
    )
    code = cli.main(["check-config", "--config", str(path), "--cache-dir", str(tmp_path)])
    assert code == 0
    assert f"tls:               {certs.cert}, client certificates from {certs.ca_pem}" in (
        capsys.readouterr().out
    )


def test_the_server_context_is_tls_1_2_or_later_and_trusts_only_the_client_ca(certs: Certs):
    context = tls.server_context(certs.cert, certs.key, certs.ca_pem)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    # No system CA may vouch for a client: only tls_client_ca's certificate is loaded.
    assert [c["subject"] for c in context.get_ca_certs()] == [
        c["subject"] for c in ssl.create_default_context(cafile=str(certs.ca_pem)).get_ca_certs()
    ]
    assert tls.server_context(certs.cert, certs.key).verify_mode == ssl.CERT_NONE


# -- proxyd init, when proxyd serves TLS ------------------------------------------------------


def test_init_writes_https_mirror_urls_when_proxyd_serves_tls(tmp_path, certs: Certs):
    registry = build_runtime(
        load_settings(None, cache_dir=tmp_path / "c", tls_cert=certs.cert, tls_key=certs.key)
    )
    containerd = engines.plan_containerd(registry, tmp_path / "certs.d")
    hosts = tomllib.loads(containerd.files[0].text)
    assert list(hosts["host"]) == ["https://127.0.0.1:5000"]
    assert any("must trust the CA" in note for note in containerd.notes)

    docker = engines.plan_docker(registry, tmp_path / "daemon.json", None)
    assert json.loads(docker.files[0].text)["registry-mirrors"] == ["https://127.0.0.1:5000"]
    assert not any("insecure-registries" in note for note in docker.notes)
    assert any("/etc/docker/certs.d/127.0.0.1:5000/ca.crt" in note for note in docker.notes)

    podman = engines.plan_podman(registry, tmp_path / "proxyd.conf")
    mirrors = tomllib.loads(podman.files[0].text)["registry"][0]["mirror"]
    assert mirrors == [{"location": "127.0.0.1:5000"}]  # no insecure = true
    assert any("/etc/containers/certs.d/127.0.0.1:5000/ca.crt" in n for n in podman.notes)


def test_init_mentions_the_client_certificate_when_proxyd_requires_one(tmp_path, certs: Certs):
    registry = build_runtime(
        load_settings(
            None,
            cache_dir=tmp_path / "c",
            tls_cert=certs.cert,
            tls_key=certs.key,
            tls_client_ca=certs.ca_pem,
        )
    )
    plan = engines.plan_docker(registry, tmp_path / "daemon.json", None)
    assert any("client certificate" in note for note in plan.notes)


def test_init_keeps_plain_http_without_tls(tmp_path):
    registry = build_runtime(load_settings(None, cache_dir=tmp_path / "c"))
    hosts = tomllib.loads(engines.plan_containerd(registry, tmp_path / "d").files[0].text)
    assert list(hosts["host"]) == ["http://127.0.0.1:5000"]
