"""aiohttp's client errors in words, for clients and logs: the host and port, and the
cause as the operating system or OpenSSL names it.

aiohttp's own messages are written for a programmer: `Cannot connect to host h:443
ssl:<ssl.SSLContext object at 0x7f…> [Connect call failed ('10.0.0.1', 443)]`, or a
payload error holding another exception's repr. Each class a registry request can
meet gets a sentence here; anything else keeps its message, minus object reprs.
"""

from __future__ import annotations

import os
import re
import ssl

import aiohttp

_ERRNO = re.compile(r"\[Errno (\d+)\]")
_OBJECT_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def describe(exc: BaseException) -> str:
    """What went wrong with a request, in a sentence (no trailing period)."""
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts are TimeoutErrors too
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return (
            f"the TLS certificate of {_address(exc)} is not trusted "
            f"({_certificate_reason(exc.certificate_error)}): give the host `ca` (its "
            "CA's PEM file), or skip_verify = true"
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"the TLS handshake with {_address(exc)} failed ({_cause(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host} ({_cause(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"cannot connect to the proxy {_address(exc)} ({_cause(exc.os_error)})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {_address(exc)} ({_cause(exc.os_error)})"
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return f"the certificate of {exc.host}:{exc.port} does not have the pinned fingerprint"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection before it answered in full"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"the body was cut short{_payload_cause(exc)}"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy answered {exc.status} {exc.message}".rstrip()
    if isinstance(exc, aiohttp.InvalidURL):
        if exc.description:  # proxyd.targets says why it does not follow a URL
            return f"{exc.url}: {exc.description}"
        return f"an invalid URL: {exc.url}"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"the answer is not valid HTTP ({exc.message})"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):  # ClientOSError, resets
        return f"the connection failed ({_cause(exc)})"
    if isinstance(exc, aiohttp.ClientConnectionResetError | ConnectionResetError):
        return "the connection was reset"
    text = _OBJECT_REPR.sub(r"\1", str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _address(exc: aiohttp.ClientConnectorError) -> str:
    host = f"[{exc.host}]" if ":" in exc.host else exc.host
    return f"{host}:{exc.port}" if exc.port is not None else host


def _cause(error: OSError) -> str:
    """The OS error in words: `Connection refused`, not `Connect call failed (…)`."""
    if isinstance(error, ssl.SSLError):
        return _ssl_reason(error)
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)
    if error.strerror:  # a resolver's (gaierror's errno is negative)
        return str(error.strerror)
    causes = dict.fromkeys(os.strerror(int(n)) for n in _ERRNO.findall(str(error)))
    if causes:  # asyncio's `Multiple exceptions: [Errno 111] …, [Errno 101] …`
        return "; ".join(causes)
    return _OBJECT_REPR.sub(r"\1", str(error)) or type(error).__name__


def _ssl_reason(error: ssl.SSLError) -> str:
    """OpenSSL's reason, `WRONG_VERSION_NUMBER` as `wrong version number`."""
    reason = error.reason or (error.strerror and str(error.strerror)) or type(error).__name__
    return str(reason).replace("_", " ").lower()


def _certificate_reason(error: BaseException) -> str:
    verify = getattr(error, "verify_message", None)  # ssl.SSLCertVerificationError
    if verify:
        return str(verify)
    if isinstance(error, ssl.SSLError):
        return _ssl_reason(error)
    return _OBJECT_REPR.sub(r"\1", str(error)) or type(error).__name__


def _payload_cause(exc: aiohttp.ClientPayloadError) -> str:
    """`: MESSAGE` of the parser error aiohttp wraps (its repr is all that str shows)."""
    for inner in (*exc.args[1:], exc.__cause__):
        message = getattr(inner, "message", None)
        if isinstance(message, str) and message:
            return f" ({message.rstrip('.')})"
        if isinstance(inner, OSError):
            return f" ({_cause(inner)})"
    return ""
