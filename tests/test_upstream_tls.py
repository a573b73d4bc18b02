"""Upstream TLS per host, in one process: fake registries served over HTTPS with
certificates from a throw-away CA (trustme), and proxyd configured with each host's
`ca`, `client` and `skip_verify`, as containerd's hosts.toml spells them."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxyd import cli
from proxyd.config import ConfigError, load_settings
from proxyd.runtime import build_runtime, check_upstream_tls
from tests.fakes import FakeImage, FakeRegistry, make_image


@dataclass
class PKI:
    """A CA, the servers' certificate (127.0.0.1) and a client certificate, as files."""

    ca: trustme.CA
    server_cert: trustme.LeafCert
    ca_pem: Path
    client_pem: Path
    client_key: Path
    other_ca_pem: Path  # a CA nothing here is signed by

    def server_context(self, clients: ssl.VerifyMode = ssl.CERT_NONE) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_cert.configure_cert(context)
        if clients != ssl.CERT_NONE:
            context.verify_mode = clients
            self.ca.configure_trust(context)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca = trustme.CA()
    client = ca.issue_cert("proxyd-client.example")
    pki = PKI(
        ca=ca,
        server_cert=ca.issue_cert("127.0.0.1", "localhost"),
        ca_pem=tmp_path / "ca.pem",
        client_pem=tmp_path / "client.pem",
        client_key=tmp_path / "client.key",
        other_ca_pem=tmp_path / "other-ca.pem",
    )
    ca.cert_pem.write_to_path(pki.ca_pem)
    client.cert_chain_pems[0].write_to_path(pki.client_pem)
    client.private_key_pem.write_to_path(pki.client_key)
    trustme.CA().cert_pem.write_to_path(pki.other_ca_pem)
    return pki


@pytest.fixture
def start_tls(aiohttp_server: Any):
    async def start(app: web.Application, context: ssl.SSLContext) -> TestServer:
        server: TestServer = await aiohttp_server(app, host="127.0.0.1", ssl=context)
        return server

    return start


def tls_config(server: TestServer, *host_lines: str) -> str:
    """The TLS registry as proxyd's default namespace; `host_lines` go into its table."""
    name = f"127.0.0.1:{server.port}"
    return "\n".join(
        [
            f'default_namespace = "{name}"',
            f'[namespaces."{name}"]',
            f'server = "https://{name}"',
            *host_lines,
        ]
    )


async def pull(proxyd: Any, image: FakeImage) -> list[tuple[int, bytes]]:
    """The manifest by tag, then every blob: (status, body) of each."""
    results = []
    for path in (
        f"/v2/{image.repository}/manifests/{image.tag}",
        *(f"/v2/{image.repository}/blobs/{digest}" for digest in image.blobs),
    ):
        response = await proxyd.get(path)
        results.append((response.status, await response.read()))
    return results


def error_message(body: bytes) -> str:
    return str(json.loads(body)["errors"][0]["message"])


async def test_a_registry_signed_by_the_hosts_ca_is_pulled_through(
    make_proxyd, start_tls, pki: PKI
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context())
    proxyd = await make_proxyd(tls_config(server, f'ca = "{pki.ca_pem}"'))
    results = await pull(proxyd, image)
    assert results == [(200, image.manifest), *((200, b) for b in image.blobs.values())]


async def test_without_the_ca_the_pull_is_a_502_about_the_certificate(
    make_proxyd, start_tls, pki: PKI
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context())
    proxyd = await make_proxyd(tls_config(server))
    response = await proxyd.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 502
    message = error_message(await response.read())
    assert "certificate" in message
    assert f"TLS certificate of 127.0.0.1:{server.port} is not trusted" in message
    assert "give the host `ca`" in message
    assert not upstream.seen  # the handshake failed before any request


async def test_an_unrelated_ca_does_not_make_the_registry_trusted(make_proxyd, start_tls, pki: PKI):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context())
    proxyd = await make_proxyd(tls_config(server, f'ca = "{pki.other_ca_pem}"'))
    response = await proxyd.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 502
    assert "certificate" in error_message(await response.read())


async def test_a_hosts_ca_adds_to_the_system_cas(make_proxyd, start_tls, pki: PKI, monkeypatch):
    """The registry's CA is the "system" one (SSL_CERT_FILE); the host's own `ca` is
    another: proxyd must trust both, as containerd does."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context())
    proxyd = await make_proxyd(tls_config(server, f'ca = "{pki.other_ca_pem}"'))
    response = await proxyd.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 200


async def test_skip_verify_pulls_without_the_ca(make_proxyd, start_tls, pki: PKI):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context())
    proxyd = await make_proxyd(tls_config(server, "skip_verify = true"))
    results = await pull(proxyd, image)
    assert [status for status, _ in results] == [200] * len(results)


async def test_a_registry_requiring_a_client_certificate_gets_the_hosts_one(
    make_proxyd, start_tls, pki: PKI
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context(ssl.CERT_REQUIRED))
    proxyd = await make_proxyd(
        tls_config(
            server, f'ca = "{pki.ca_pem}"', f'client = [["{pki.client_pem}", "{pki.client_key}"]]'
        )
    )
    results = await pull(proxyd, image)
    assert results == [(200, image.manifest), *((200, b) for b in image.blobs.values())]


async def test_without_a_client_certificate_such_a_registry_is_a_502(
    make_proxyd, start_tls, pki: PKI
):
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context(ssl.CERT_REQUIRED))
    proxyd = await make_proxyd(tls_config(server, f'ca = "{pki.ca_pem}"'))
    response = await proxyd.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 502
    assert not upstream.seen


@dataclass
class Storage:
    """Blob storage behind a redirect: records the client certificate of each request."""

    blobs: dict[str, bytes]
    peercerts: list[Any] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        self.peercerts.append(request.transport.get_extra_info("peercert"))
        digest = request.path.rsplit("/", 1)[-1]
        if digest not in self.blobs:
            return web.Response(status=404)
        return web.Response(body=self.blobs[digest], headers={"Docker-Content-Digest": digest})


async def test_a_redirect_to_another_https_host_gets_the_ca_but_not_the_client_certificate(
    make_proxyd, start_tls, pki: PKI
):
    image = make_image()
    storage = Storage(dict(image.blobs))
    # The storage asks for a certificate (and would see one) but does not insist.
    storage_server = await start_tls(storage.app(), pki.server_context(ssl.CERT_OPTIONAL))
    upstream = FakeRegistry(redirect_blobs_to=f"https://127.0.0.1:{storage_server.port}")
    upstream.add(image)
    server = await start_tls(upstream.app(), pki.server_context(ssl.CERT_REQUIRED))
    proxyd = await make_proxyd(
        tls_config(
            server, f'ca = "{pki.ca_pem}"', f'client = [["{pki.client_pem}", "{pki.client_key}"]]'
        )
    )
    response = await proxyd.get(f"/v2/{image.repository}/blobs/{image.layer}")
    assert response.status == 200
    assert await response.read() == image.blobs[image.layer]
    assert upstream.requests("/blobs/"), "the registry (which requires the certificate) was asked"
    assert storage.peercerts == [None], "the storage host saw proxyd's client certificate"

    # The control: a client that does present the certificate is seen by the storage.
    context = ssl.create_default_context(cafile=str(pki.ca_pem))
    context.load_cert_chain(pki.client_pem, pki.client_key)
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"https://127.0.0.1:{storage_server.port}/v2/x/blobs/{image.layer}", ssl=context
        ) as direct,
    ):
        assert direct.status == 200
    assert storage.peercerts[-1] is not None


async def test_a_missing_ca_file_is_a_clear_502_not_a_crash(make_proxyd, start_tls, pki, tmp_path):
    """In process (no load-time check): the chain fails naming the file."""
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context())
    missing = tmp_path / "nowhere" / "ca.pem"
    proxyd = await make_proxyd(tls_config(server, f'ca = "{missing}"'))
    response = await proxyd.get(f"/v2/{image.repository}/manifests/{image.tag}")
    assert response.status == 502
    message = error_message(await response.read())
    assert str(missing) in message
    assert "cannot read CA file" in message


def write_config(tmp_path: Path, host_lines: list[str]) -> Path:
    path = tmp_path / "check.toml"
    path.write_text(
        "\n".join(['[namespaces."r.example"]', 'server = "https://r.example"', *host_lines])
    )
    return path


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (['ca = "{tmp}/missing-ca.pem"'], r"cannot read CA file .*missing-ca\.pem"),
        (['ca = "{tmp}/client.key"'], r"CA file .*client\.key holds no usable PEM certificate"),
        (
            ['client = [["{tmp}/client.pem", "{tmp}/missing.key"]]'],
            r"cannot read client key .*missing\.key",
        ),
        (
            ['client = [["{tmp}/client.pem", "{tmp}/other.key"]]'],
            r"the key does not belong to the certificate",
        ),
    ],
)
def test_unusable_tls_files_are_a_config_error_at_load(tmp_path, pki, lines, expected):
    trustme.CA().issue_cert("x.example").private_key_pem.write_to_path(tmp_path / "other.key")
    path = write_config(tmp_path, [line.format(tmp=tmp_path) for line in lines])
    registry = build_runtime(load_settings(path, cache_dir=tmp_path / "cache"))
    with pytest.raises(ConfigError, match=expected) as caught:
        check_upstream_tls(registry)
    assert "https://r.example" in str(caught.value)


def test_tls_files_of_a_mirror_are_checked_too(tmp_path, pki):
    path = write_config(
        tmp_path, ['[namespaces."r.example".host."https://m.example"]', 'ca = "/no/such/ca.pem"']
    )
    registry = build_runtime(load_settings(path))
    with pytest.raises(ConfigError, match=r"https://m\.example: cannot read CA file /no/such"):
        check_upstream_tls(registry)


def test_tls_files_of_the_default_hosts_toml_are_checked(tmp_path):
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "_default").mkdir(parents=True)
    (hosts_dir / "_default" / "hosts.toml").write_text('ca = "ca.crt"\n')
    registry = build_runtime(load_settings(None, hosts_dir=hosts_dir))
    with pytest.raises(ConfigError, match=r"_default/hosts\.toml: cannot read CA file .*ca\.crt"):
        check_upstream_tls(registry)


def test_files_of_plain_http_hosts_and_skip_verify_cas_are_not_needed(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(
        '[namespaces."r.example"]\nserver = "http://r.example"\nca = "/no/ca.pem"\n'
        '[namespaces."s.example"]\nserver = "https://s.example"\nca = "/no/ca.pem"\n'
        "skip_verify = true\n"
    )
    check_upstream_tls(build_runtime(load_settings(path)))


def test_check_config_reports_an_unreadable_ca_and_exits_2(tmp_path, capsys):
    path = write_config(tmp_path, ['ca = "/no/such/ca.pem"'])
    code = cli.main(["check-config", "--config", str(path), "--cache-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot read CA file /no/such/ca.pem" in err
    assert "Traceback" not in err


def test_a_key_inside_the_certificate_file_is_accepted(tmp_path, pki: PKI):
    both = tmp_path / "both.pem"
    both.write_bytes(pki.client_pem.read_bytes() + pki.client_key.read_bytes())
    path = write_config(tmp_path, [f'client = "{both}"'])
    check_upstream_tls(build_runtime(load_settings(path)))


async def test_a_docker_certs_d_directory_gives_the_registry_its_ca_and_client_certificate(
    make_proxyd, start_tls, pki: PKI, tmp_path
):
    """Docker's layout, no hosts.toml (containerd's loadCertFiles): `ca.crt` trusted,
    `client.cert` with `client.key` presented, to a registry that requires it."""
    upstream = FakeRegistry()
    image = upstream.add(make_image())
    server = await start_tls(upstream.app(), pki.server_context(ssl.CERT_REQUIRED))
    directory = tmp_path / "certs.d" / f"127.0.0.1_{server.port}_"
    directory.mkdir(parents=True)
    (directory / "ca.crt").write_bytes(pki.ca_pem.read_bytes())
    (directory / "client.cert").write_bytes(pki.client_pem.read_bytes())
    (directory / "client.key").write_bytes(pki.client_key.read_bytes())
    proxyd = await make_proxyd(
        f'default_namespace = "127.0.0.1:{server.port}"', hosts_dir=tmp_path / "certs.d"
    )
    results = await pull(proxyd, image)
    assert results == [(200, image.manifest), *((200, b) for b in image.blobs.values())]
