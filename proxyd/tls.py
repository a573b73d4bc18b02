"""TLS contexts: towards an upstream host (its `ca`, `client`, `skip_verify`) and for
proxyd's own listener (`tls_cert`, `tls_key`, `tls_client_ca`).

Every failure to read or use a file is a `TLSFileError` naming the file and what is
wrong with it, so configuration checks and the upstream client can say it plainly.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from proxyd.hosts import RegistryHost


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be read or used."""


def _readable(path: str | Path, what: str) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise TLSFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for a passphrase.
    raise TLSFileError("is encrypted; proxyd needs an unencrypted key")


def load_ca(context: ssl.SSLContext, path: str | Path, what: str = "CA file") -> None:
    """Trust the certificates in `path` too (on top of whatever the context trusts)."""
    _readable(path, what)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise TLSFileError(
            f"{what} {path} holds no usable PEM certificate ({exc.reason})"
        ) from None


def load_cert(
    context: ssl.SSLContext,
    cert: str | Path,
    key: str | Path | None,
    labels: tuple[str, str] = ("client certificate", "client key"),
) -> None:
    """Present `cert` (with `key`, or the key inside `cert`)."""
    cert_label, key_label = labels
    _readable(cert, cert_label)
    if key is not None:
        _readable(key, key_label)
    try:
        context.load_cert_chain(str(cert), str(key) if key is not None else None, _no_password)
    except TLSFileError as exc:
        raise TLSFileError(f"{key_label} {key or cert} {exc}") from None
    except ssl.SSLError as exc:
        pair = f"{cert_label} {cert}" + (f" and {key_label} {key}" if key is not None else "")
        detail = (
            "the key does not belong to the certificate"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else f"not a PEM certificate and key ({exc.reason})"
        )
        raise TLSFileError(f"{pair}: {detail}") from None


def has_own_context(host: RegistryHost, *, same_origin: bool) -> bool:
    """Whether `host`'s requests need a context of their own: with no `ca` or `client`
    files and verification on, aiohttp's verified one (`ssl=True`: the system's CAs,
    TLS >= 1.2, made once when aiohttp is imported) is the same, and a second copy of
    the system's CAs cost 0.55 MiB of the idle RSS (docs/performance.md, "HTTPS reads,
    one copy of the system's CAs")."""
    return bool(host.skip_verify or host.ca or (same_origin and host.client))


def upstream_context(host: RegistryHost, *, same_origin: bool) -> ssl.SSLContext:
    """The context for `host`'s requests: the system CAs plus the host's `ca` files
    (they apply to redirects too), or no verification with `skip_verify`; the client
    certificates only for the host itself (`same_origin`)."""
    context = ssl.create_default_context()  # the system's CAs, TLS >= 1.2
    if host.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        for ca in host.ca:
            load_ca(context, ca)
    if same_origin:
        for cert, key in host.client:
            load_cert(context, cert, key)
    return context


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """proxyd's listener: TLS >= 1.2 with `cert` and `key`; with `client_ca`, clients
    must present a certificate issued by it (and only by it: no system CA counts)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    load_cert(context, cert, key, ("tls_cert", "tls_key"))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        load_ca(context, client_ca, "tls_client_ca")
    return context
