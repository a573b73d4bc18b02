"""Harness for end-to-end tests against real peers.

Every peer a test talks to is a real program (distribution's ``docker-registry``,
``skopeo``, ``containerd``/``ctr``, ``podman``, ``dockerd``) or a small in-process
aiohttp server standing in for one (the token server, faulty mirrors).  All of them
listen on 127.0.0.1 only (or inside a network namespace of the test's own), on a free
port chosen at run time, keep their state in a temporary directory and are stopped by
the fixture that started them.

Modules, by role:

- ``registry``: distribution (no auth, htpasswd, token auth, pull-through proxy).
- ``tokenserver``: a Docker/OAuth2 token server issuing ES256 JWTs.
- ``httpserver``: runs an aiohttp application in a background thread.
- ``mirrors``: misbehaving mirrors (404, 500, hang) that record what they receive.
- ``image``: builds a small OCI image layout from a seed and pushes it.
- ``clients``: skopeo, containerd/ctr and podman, each bounded in time.
- ``proxyd``: proxyd itself, as a subprocess.
- ``roundrobin``: one address in front of several replicas, a request to each in turn.
- ``dockerd``: a private docker engine and its CLI.
- ``netns``: network namespaces, a container's or a pod's network.
- ``tinyproxy``: a forward proxy (a corporate network's), whose log names each request.
- ``children``: how every one of them is started, so that it dies with the test session
  (or the benchmark), even one killed with SIGKILL.

This module holds what they share: finding binaries, free ports, waiting for a
server, and running commands with a deadline.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
REQUIRE_PEERS_ENV = "PROXYD_REQUIRE_PEERS"
OPTIONAL_PEERS_ENV = "PROXYD_OPTIONAL_PEERS"


def peers_required() -> bool:
    """True when a missing peer must fail the test rather than skip it (CI)."""
    return os.environ.get(REQUIRE_PEERS_ENV, "") == "1"


def require_binary(name: str) -> str:
    """Return the absolute path of ``name``; skip the test when it is missing.

    With ``PROXYD_REQUIRE_PEERS=1`` a missing binary fails the test instead, unless
    it is listed in ``PROXYD_OPTIONAL_PEERS`` (CI lists podman when it would not install).
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"peer binary {name!r} is not installed"
    optional = os.environ.get(OPTIONAL_PEERS_ENV, "").split()
    if peers_required() and name not in optional:
        pytest.fail(f"{message} and {REQUIRE_PEERS_ENV}=1", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class PeerError(AssertionError):
    """A peer did not start, answer or finish as the harness expected."""


class Listening:
    """A peer on 127.0.0.1, on the port it bound when it started (``_port``)."""

    peer: str = "the peer"  # its name in errors
    _port: int | None

    @property
    def port(self) -> int:
        if self._port is None:
            raise PeerError(f"{self.peer} is not running")
        return self._port

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as clients write it in image references."""
        return f"{LOOPBACK}:{self.port}"


def loopback_url(url: str, *, tls: bool = False) -> str:
    """``url`` itself, after checking that it points at 127.0.0.1 over plain HTTP
    (or HTTPS, with ``tls``: a peer serving a test CA's certificate).

    Every peer of these tests listens there; anything else is a bug in a test.
    """
    scheme = "https" if tls else "http"
    if not url.startswith(f"{scheme}://{LOOPBACK}:"):
        raise PeerError(f"refusing a request to {url!r}: tests only talk to {scheme}://{LOOPBACK}")
    return url


@functools.cache
def _trusting(ca: Path) -> ssl.SSLContext:
    """A client context trusting only `ca`: made once, not at every poll of a start."""
    return ssl.create_default_context(cafile=str(ca))


def http_status(url: str, timeout: float = 2.0, *, ca: Path | None = None) -> int | None:
    """The status of ``GET url``, or None when nothing answers; with ``ca``, over HTTPS
    trusting only that CA."""
    context = None if ca is None else _trusting(ca)
    try:
        # loopback_url checks the scheme S310 worries about.
        checked = loopback_url(url, tls=ca is not None)
        with urllib.request.urlopen(checked, timeout=timeout, context=context) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (OSError, urllib.error.URLError):
        return None


def wait_for_http(
    url: str,
    *,
    accept: Callable[[int], bool],
    timeout: float,
    alive: Callable[[], str | None] = lambda: None,
    what: str = "server",
    ca: Path | None = None,
) -> int:
    """Poll ``GET url`` until ``accept(status)``; return that status (over HTTPS
    trusting ``ca``, if given).

    ``alive`` returns None while the server's process runs, or a description of its
    death (exit code and output), which ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last: int | None = None
    while True:
        died = alive()
        if died is not None:
            raise PeerError(f"{what} exited before answering {url}:\n{died}")
        last = http_status(url, timeout=1.0, ca=ca)
        if last is not None and accept(last):
            return last
        if time.monotonic() > deadline:
            raise PeerError(f"{what} did not answer {url} within {timeout}s (last status {last})")
        time.sleep(0.05)


@dataclass(frozen=True)
class Completed:
    """A finished command: what ran, how it ended, and what it printed."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n"
            f"exit {self.returncode} after {self.duration:.1f}s\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n"
            f"--- stderr ---\n{self.stderr[-6000:]}"
        )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    cwd: Path | None = None,
) -> Completed:
    """Run a command with a deadline; on failure (when ``check``) raise with its output.

    The command is killed when the deadline passes, and that is a failure too.
    """
    args = tuple(os.fspath(a) for a in argv)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else ""
        errtext = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        done = Completed(args, -9, out, errtext, time.monotonic() - started)
        raise PeerError(f"command timed out after {timeout}s\n{done.describe()}") from None
    done = Completed(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    if check and proc.returncode != 0:
        raise PeerError(f"command failed\n{done.describe()}")
    return done


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; always reaps the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


@dataclass(frozen=True)
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


def http_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
    timeout: float = 10.0,
) -> HttpResult:
    """One plain HTTP request; any status is a result, only no answer is an error."""
    request = urllib.request.Request(  # noqa: S310 (loopback_url checks the scheme)
        loopback_url(url), data=data, method=method, headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return HttpResult(int(response.status), dict(response.headers), response.read())
    except urllib.error.HTTPError as err:
        return HttpResult(int(err.code), dict(err.headers), err.read())
