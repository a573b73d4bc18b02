"""`proxyd health`: exit 0 when the proxyd of the given settings answers where it
listens, over HTTP or HTTPS with its own certificate, else 1 with the reason on
stderr. Against real proxyd processes (and one stand-in that answers 503) on 127.0.0.1."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from proxyd import cli
from proxyd.healthcheck import probe_address
from tests.peers import free_port
from tests.peers.httpserver import ThreadedServer
from tests.peers.proxyd import ProxydProcess, proxyd_config


@dataclass
class Certs:
    cert: Path
    key: Path
    ca: Path
    client: Path  # certificate and key in one file
    other_cert: Path  # the same names, issued again: not the certificate proxyd serves


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    found = Certs(*(tmp_path / name for name in ("c.pem", "k.pem", "ca.pem", "cl.pem", "o.pem")))
    server = ca.issue_cert("proxyd.example")  # no IP address: the probe needs none
    server.cert_chain_pems[0].write_to_path(found.cert)
    server.private_key_pem.write_to_path(found.key)
    ca.cert_pem.write_to_path(found.ca)
    ca.issue_cert("client.example").private_key_and_cert_chain_pem.write_to_path(found.client)
    ca.issue_cert("proxyd.example").cert_chain_pems[0].write_to_path(found.other_cert)
    return found


@pytest.fixture(autouse=True)
def _no_proxyd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("PROXYD_")]:
        monkeypatch.delenv(name)


def health(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["health", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def proxyd(tmp_path: Path) -> Iterator[ProxydProcess]:
    with ProxydProcess(proxyd_config(default_namespace=None), tmp_path / "plain") as process:
        yield process


# -- where it asks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "asked"),
    [
        ("0.0.0.0:5000", ("127.0.0.1", 5000)),
        ("[::]:5000", ("::1", 5000)),
        ("127.0.0.1:5001", ("127.0.0.1", 5001)),
        ("10.1.2.3:80", ("10.1.2.3", 80)),
        ("[fd00::1]:5000", ("fd00::1", 5000)),
        ("localhost:5000", ("localhost", 5000)),
    ],
)
def test_a_wildcard_listen_address_is_asked_on_loopback(listen: str, asked: tuple[str, int]):
    assert probe_address(listen) == asked


# -- plain HTTP --------------------------------------------------------------------------


def test_health_exits_0_when_proxyd_answers_healthz(proxyd: ProxydProcess, capsys):
    code, out, err = health("--listen", proxyd.host, capsys=capsys)
    assert (code, err) == (0, "")
    assert out == f"http://{proxyd.host}/healthz answered 200\n"


def test_health_ready_asks_readyz(proxyd: ProxydProcess, capsys):
    code, out, _ = health("--ready", "--listen", proxyd.host, capsys=capsys)
    assert code == 0
    assert out == f"http://{proxyd.host}/readyz answered 200\n"


def test_health_reads_listen_from_the_environment_and_the_config_file(
    proxyd: ProxydProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setenv("PROXYD_LISTEN", f"0.0.0.0:{proxyd.port}")
    assert health(capsys=capsys)[0] == 0
    monkeypatch.delenv("PROXYD_LISTEN")
    config = tmp_path / "proxyd.toml"
    config.write_text(f'listen = "0.0.0.0:{proxyd.port}"\n')
    assert health("--config", str(config), capsys=capsys)[0] == 0


def test_health_exits_1_saying_nothing_listens_when_proxyd_is_down(capsys):
    port = free_port()
    code, out, err = health("--listen", f"127.0.0.1:{port}", capsys=capsys)
    assert (code, out) == (1, "")
    assert err == (
        f"proxyd health: http://127.0.0.1:{port}/healthz: connection refused: "
        "nothing listens there\n"
    )


def test_health_exits_1_with_the_reason_readyz_gives(capsys):
    async def unready(request: web.Request) -> web.Response:
        reason = "cache directory /var/cache/proxyd/tmp is not writable: Read-only file system"
        return web.json_response({"status": "unavailable", "reason": reason}, status=503)

    app = web.Application()
    app.router.add_get("/readyz", unready)
    with ThreadedServer(app) as server:
        address = server.host
        code, _, err = health("--ready", "--listen", address, capsys=capsys)
    assert code == 1
    assert err == (
        f"proxyd health: http://{address}/readyz answered 503: cache directory "
        "/var/cache/proxyd/tmp is not writable: Read-only file system\n"
    )


def test_health_exits_1_not_2_when_the_settings_cannot_be_read(tmp_path: Path, capsys):
    code, _, err = health("--config", str(tmp_path / "missing.toml"), capsys=capsys)
    assert code == 1  # Docker reserves 2 for itself
    assert err.startswith("proxyd health: cannot read the settings: cannot read ")


def test_health_exits_1_when_proxyd_does_not_answer_in_time(proxyd: ProxydProcess, capsys):
    with proxyd.suspended():  # the port accepts, nothing answers
        code, _, err = health("--listen", proxyd.host, "--timeout", "0.5", capsys=capsys)
    assert code == 1
    assert err == f"proxyd health: http://{proxyd.host}/healthz: no answer within 0.5 s\n"


# -- HTTPS ---------------------------------------------------------------------------------


def tls_proxyd(tmp_path: Path, certs: Certs, *extra: str) -> ProxydProcess:
    """proxyd serving HTTPS with certs.cert (and the extra flags)."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.check_hostname = False  # the certificate names proxyd.example only
    context.load_cert_chain(certs.client)  # for when proxyd asks for one
    args = ["--tls-cert", str(certs.cert), "--tls-key", str(certs.key), *extra]
    config = proxyd_config(default_namespace=None)
    return ProxydProcess(config, tmp_path / "tls", extra_args=args, tls=context)


def test_health_speaks_https_when_tls_cert_is_set_and_expects_that_certificate(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch, capsys
):
    with tls_proxyd(tmp_path, certs) as proxyd:
        monkeypatch.setenv("PROXYD_TLS_CERT", str(certs.cert))
        monkeypatch.setenv("PROXYD_TLS_KEY", str(certs.key))
        code, out, err = health("--listen", proxyd.host, capsys=capsys)
        assert (code, err) == (0, "")
        assert out == f"https://{proxyd.host}/healthz answered 200\n"

        monkeypatch.setenv("PROXYD_TLS_CERT", str(certs.other_cert))
        code, _, err = health("--listen", proxyd.host, capsys=capsys)
        assert code == 1
        assert "serves another certificate than tls_cert" in err

        monkeypatch.delenv("PROXYD_TLS_CERT")
        monkeypatch.delenv("PROXYD_TLS_KEY")
        code, _, err = health("--listen", proxyd.host, capsys=capsys)
        assert code == 1
        assert "closed without an answer (does it serve HTTPS? then tls_cert" in err


def test_health_under_tls_client_ca_checks_the_handshake_or_asks_with_a_client_cert(
    tmp_path: Path, certs: Certs, capsys
):
    client_ca = ["--tls-client-ca", str(certs.ca)]
    with tls_proxyd(tmp_path, certs, *client_ca) as proxyd:
        settings = ["--listen", proxyd.host, "--tls-cert", str(certs.cert)]
        settings += ["--tls-key", str(certs.key), *client_ca]
        code, out, err = health(*settings, capsys=capsys)
        assert (code, err) == (0, "")
        assert "TLS handshake showed proxyd's certificate" in out
        assert "no client certificate" in out

        code, out, err = health(
            "--ready", *settings, "--client-cert", str(certs.client), capsys=capsys
        )
        assert (code, err) == (0, "")
        assert out == f"https://{proxyd.host}/readyz answered 200\n"

        with proxyd.suspended():  # a hung daemon completes no handshake
            code, _, err = health(*settings, "--timeout", "0.5", capsys=capsys)
        assert code == 1
        assert "no answer within 0.5 s" in err
