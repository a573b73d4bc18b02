"""`proxyd health`: does the proxyd of these settings serve? Exit 0 when it does, 1 with
the reason on stderr when it does not: a container's HEALTHCHECK, a Kubernetes exec
probe and a script alike, none of which knows where proxyd listens or whether it
speaks HTTPS. The probe does: it reads the settings `proxyd serve` reads (flags,
PROXYD_*, --config) and asks `GET /healthz` (`--ready`: `/readyz`) where proxyd listens.

- The address is `listen`; a wildcard (0.0.0.0, ::) is asked on loopback (127.0.0.1,
  ::1), where a process beside proxyd, in its container or pod, reaches it.
- With `tls_cert` it speaks HTTPS and expects exactly that certificate (the first in
  the file), compared byte for byte rather than verified against CAs: it is proxyd's
  own, and may name no address the probe could check (a DNS name, a service's).
- With `tls_client_ca` proxyd asks every client for a certificate. Given one
  (`--client-cert`), the probe asks the endpoint. Without, it checks what it can:
  the TLS handshake completes with proxyd's certificate, then proxyd refuses the probe
  for having no client certificate (which takes proxyd's event loop, so a hung daemon
  fails); the endpoint's answer, and so /readyz's check of the cache, is not seen, and
  the message on stdout says so.
- Sockets systemd passes (socket activation) belong to the daemon; another process
  cannot see them. The probe asks `listen`, which README has name the same address; a
  Unix socket passed that way is not probed (systemd supervises that daemon itself).

Standard library only for the asking: a probe starts often, so it imports neither
aiohttp nor the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxyd import tls
from proxyd.config import ConfigError, Settings, split_listen

DEFAULT_TIMEOUT = 3.0  # seconds; under Docker's and the examples' probe timeouts
LIVE_PATH = "/healthz"
READY_PATH = "/readyz"
_PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # where a wildcard is reached

DESCRIPTION = """\
Ask the proxyd of these settings (the same flags, PROXYD_* variables and --config as
`proxyd serve`) for GET /healthz, or /readyz with --ready, where it listens: `listen`
(a wildcard address on loopback), over HTTPS with its own certificate when tls_cert is
set. Exit status 0 when it answers 200, else 1 with the reason on stderr.
"""


class Unhealthy(Exception):
    """Why the probe failed, in words: the host, and what went wrong there."""


@dataclass(frozen=True)
class Probe:
    """Where and how to ask."""

    host: str
    port: int
    served_certificate: bytes | None = None  # DER of tls_cert's first certificate: HTTPS
    client_ca: bool = False  # proxyd asks clients for a certificate (tls_client_ca)
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def handshake_only(self) -> bool:
        return self.client_ca and self.client_cert is None

    def url(self, path: str) -> str:
        scheme = "http" if self.served_certificate is None else "https"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}"


def probe_address(listen: str) -> tuple[str, int]:
    """Where a process beside proxyd reaches `listen`: a wildcard on loopback."""
    host, port = split_listen(listen)
    return _WILDCARDS.get(host, host), port


def plan(
    settings: Settings, client_cert: Path | None = None, client_key: Path | None = None
) -> Probe:
    host, port = probe_address(settings.listen)
    if settings.tls_cert is None:
        return Probe(host, port)
    return Probe(
        host,
        port,
        served_certificate(settings.tls_cert),
        client_ca=settings.tls_client_ca is not None,
        client_cert=client_cert,
        client_key=client_key,
    )


def served_certificate(path: Path) -> bytes:
    """The certificate proxyd serves from `path`: the first one in it, as DER."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise Unhealthy(f"cannot read tls_cert {path}: {exc.strerror or exc}") from None
    match = _PEM_CERTIFICATE.search(text)
    try:
        if match is None:
            raise ValueError
        return ssl.PEM_cert_to_DER_cert(match[0])
    except ValueError:
        raise Unhealthy(f"tls_cert {path} holds no PEM certificate") from None


def check(probe: Probe, path: str = LIVE_PATH, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Ask `path`; the outcome in words when proxyd answered 200, else `Unhealthy`."""
    url = probe.url(path)
    connection = _connection(probe, timeout)
    try:
        try:
            connection.connect()
        except ssl.SSLError as exc:
            raise Unhealthy(f"{url}: the TLS handshake failed ({_ssl_reason(exc)})") from None
        except OSError as exc:
            raise Unhealthy(f"{url}: {_os_reason(exc, timeout)}") from None
        if probe.served_certificate is not None:
            _check_certificate(connection, probe, url)
        if probe.handshake_only:
            return _refused_for_no_certificate(connection, url, timeout)
        try:
            connection.request("GET", path, headers={"User-Agent": "proxyd-health"})
            response = connection.getresponse()
            body = response.read(4096)
        except ssl.SSLError as exc:
            raise Unhealthy(f"{url}: TLS failed ({_ssl_reason(exc)})") from None
        except http.client.RemoteDisconnected:
            plain = probe.served_certificate is None
            hint = " (does it serve HTTPS? then tls_cert is missing here)" if plain else ""
            raise Unhealthy(f"{url}: the connection closed without an answer{hint}") from None
        except OSError as exc:
            raise Unhealthy(f"{url}: {_os_reason(exc, timeout)}") from None
        except http.client.HTTPException as exc:
            raise Unhealthy(f"{url}: no HTTP answer ({type(exc).__name__})") from None
    finally:
        connection.close()
    if response.status != 200:
        raise Unhealthy(f"{url} answered {response.status}{_reason(body)}")
    return f"{url} answered 200"


def _connection(probe: Probe, timeout: float) -> http.client.HTTPConnection:
    if probe.served_certificate is None:
        return http.client.HTTPConnection(probe.host, probe.port, timeout=timeout)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # No CA check: the certificate is compared with tls_cert itself after the handshake.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if probe.handshake_only:
        # TLS 1.3 completes the handshake before the server judges the client's
        # certificate, so the probe sees proxyd's certificate, then its refusal.
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if probe.client_cert is not None:
        try:
            tls.load_cert(context, probe.client_cert, probe.client_key)
        except tls.TLSFileError as exc:
            raise Unhealthy(str(exc)) from None
    return http.client.HTTPSConnection(probe.host, probe.port, timeout=timeout, context=context)


def _check_certificate(connection: http.client.HTTPConnection, probe: Probe, url: str) -> None:
    sock = connection.sock
    served = sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
    if served != probe.served_certificate:
        raise Unhealthy(
            f"{url} serves another certificate than tls_cert: another server holds the "
            "port, or proxyd was started with an older certificate"
        )


def _refused_for_no_certificate(
    connection: http.client.HTTPConnection, url: str, timeout: float
) -> str:
    """Without a client certificate: healthy when proxyd, the handshake complete, turns
    the probe away for sending none: it closes the connection (with the TLS alert
    `certificate required`, or without a word, as asyncio does). Nothing is sent, so
    nothing is left unread when proxyd closes (which would reset the connection)."""
    sock = connection.sock
    if not isinstance(sock, ssl.SSLSocket):  # connect() made one: HTTPSConnection
        raise Unhealthy(f"{url}: no TLS connection")
    try:
        sock.settimeout(timeout)
        data = sock.recv(1)
    except ssl.SSLError as exc:
        if "CERTIFICATE_REQUIRED" not in str(exc.reason):
            raise Unhealthy(f"{url}: TLS failed ({_ssl_reason(exc)})") from None
    except ConnectionResetError:
        pass
    except OSError as exc:
        raise Unhealthy(
            f"{url}: {_os_reason(exc, timeout)}, but proxyd turns away clients without a "
            "certificate (tls_client_ca) at once"
        ) from None
    else:
        if data:
            raise Unhealthy(f"{url}: an answer before any request: is this proxyd?")
    return (
        f"{url}: the TLS handshake showed proxyd's certificate, and proxyd turned away "
        "the probe for having no client certificate (tls_client_ca); give one with "
        "--client-cert to ask the endpoint itself"
    )


def _os_reason(exc: OSError, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host ({exc.strerror})"
    return exc.strerror or str(exc) or type(exc).__name__


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or type(exc).__name__).replace("_", " ").lower()


def _reason(body: bytes) -> str:
    """`: REASON` from proxyd's `{"status": "unavailable", "reason": …}`, if there."""
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return ""
    return f": {reason}" if isinstance(reason, str) and reason else ""


# -- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ready", action="store_true", help=f"ask {READY_PATH} (readiness), not {LIVE_PATH}"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"to connect, and again to be answered (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--client-cert",
        type=Path,
        metavar="FILE",
        help="with tls_client_ca: a PEM client certificate to present (else only the "
        "TLS handshake is checked)",
    )
    parser.add_argument("--client-key", type=Path, metavar="FILE", help="its PEM key")


def main(load: Callable[[], Settings], args: argparse.Namespace) -> int:
    """Exit status 0 (healthy) or 1: Docker reserves 2, so a configuration that cannot
    be read is 1 too."""
    try:
        settings = load()
        probe = plan(settings, args.client_cert, args.client_key)
        outcome = check(probe, READY_PATH if args.ready else LIVE_PATH, args.timeout)
    except ConfigError as exc:
        print(f"proxyd health: cannot read the settings: {exc}", file=sys.stderr)
        return 1
    except Unhealthy as exc:
        print(f"proxyd health: {exc}", file=sys.stderr)
        return 1
    print(outcome)
    return 0
