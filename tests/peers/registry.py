"""distribution (``docker-registry serve``) on 127.0.0.1, in a temporary directory.

Modes:

- ``Registry.plain(dir)``: no authentication.
- ``Registry.htpasswd(dir)``: Basic authentication from a bcrypt htpasswd file.
- ``Registry.token(dir, token_server)``: Bearer tokens from ``TokenServer``.
- ``Registry.over_tls(dir, tls, storage)``: no authentication, over HTTPS (a test
  CA's certificate), optionally serving another registry's storage.
- ``Registry.pull_through(dir, remote_url)``: a pull-through cache (``proxy.remoteurl``)
  of another registry, usable as a mirror.

The process can be stopped and started again on the same port and storage (for
"upstream down" scenarios).  Its JSON log on stderr is parsed into ``requests()``:
one ``RegistryRequest`` per HTTP request it completed, so tests can count what the
registry itself served.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import bcrypt

from tests.peers import (
    LOOPBACK,
    Listening,
    PeerError,
    free_port,
    http_request,
    require_binary,
    stop_process,
    wait_for_http,
)
from tests.peers.children import popen
from tests.peers.tokenserver import TokenServer

DEFAULT_USERS: Mapping[str, str] = {"alice": "wonderland"}
TOKEN_SERVICE = "proxyd-test-registry"
START_TIMEOUT = 15.0


@dataclass(frozen=True)
class TLSFiles:
    """A server's certificate and key for 127.0.0.1, and the CA that issued them."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def issue(cls, directory: Path) -> TLSFiles:
        """A throw-away CA (trustme) and its certificate for 127.0.0.1, as files."""
        import trustme  # a dev dependency: only what serves TLS needs it

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert(LOOPBACK)
        files = cls(directory / "server.pem", directory / "server.key", directory / "ca.pem")
        leaf.cert_chain_pems[0].write_to_path(files.cert)
        leaf.private_key_pem.write_to_path(files.key)
        ca.cert_pem.write_to_path(files.ca)
        return files


@dataclass(frozen=True)
class RegistryRequest:
    """One request distribution logged as completed."""

    method: str
    uri: str
    status: int
    written: int
    useragent: str

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]

    @property
    def is_blob(self) -> bool:
        return "/blobs/sha256:" in self.path


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    """An htpasswd file with bcrypt hashes, as ``htpasswd -B`` writes it."""
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        lines.append(f"{user}:{hashed}\n")
    path.write_text("".join(lines))
    return path


class Registry(Listening):
    """One distribution process; see the module docstring for the modes."""

    peer = "the registry"

    def __init__(
        self,
        workdir: Path,
        *,
        kind: str,
        auth: dict[str, Any] | None = None,
        proxy: dict[str, str] | None = None,
        storage: Path | None = None,
        tls: TLSFiles | None = None,
    ) -> None:
        self.workdir = workdir
        self.kind = kind
        self.storage = storage or workdir / "storage"
        self.tls = tls
        self.config_path = workdir / "config.yml"
        self._auth = auth
        self._proxy = proxy
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0
        self._secret = secrets.token_hex(16)
        self.users: Mapping[str, str] = {}
        self.token_service: str | None = None
        self.env: dict[str, str] = {}  # the process's, over this one's

    # -- constructors ----------------------------------------------------------

    @classmethod
    def plain(cls, workdir: Path) -> Registry:
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(workdir, kind="plain")

    @classmethod
    def over_tls(cls, workdir: Path, tls: TLSFiles, storage: Path | None = None) -> Registry:
        """No authentication, served over HTTPS with ``tls``'s certificate; with
        ``storage``, another registry's (it serves what that one holds)."""
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(workdir, kind="tls", storage=storage, tls=tls)

    @classmethod
    def htpasswd(cls, workdir: Path, users: Mapping[str, str] = DEFAULT_USERS) -> Registry:
        workdir.mkdir(parents=True, exist_ok=True)
        path = write_htpasswd(workdir / "htpasswd", users)
        registry = cls(
            workdir,
            kind="htpasswd",
            auth={"htpasswd": {"realm": "proxyd-test-basic", "path": str(path)}},
        )
        registry.users = dict(users)
        return registry

    @classmethod
    def token(
        cls, workdir: Path, token_server: TokenServer, *, service: str = TOKEN_SERVICE
    ) -> Registry:
        workdir.mkdir(parents=True, exist_ok=True)
        bundle = token_server.write_rootcertbundle(workdir / "token-signer.pem")
        registry = cls(
            workdir,
            kind="token",
            auth={
                "token": {
                    "realm": token_server.realm,
                    "service": service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(bundle),
                }
            },
        )
        registry.users = dict(token_server.policy.users)
        registry.token_service = service
        return registry

    @classmethod
    def pull_through(
        cls,
        workdir: Path,
        remote_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        trust: Path | None = None,
    ) -> Registry:
        """A pull-through mirror of `remote_url`; `trust`: the one CA it trusts for an
        https remote (Go's crypto/x509 reads `SSL_CERT_FILE` instead of the system's)."""
        workdir.mkdir(parents=True, exist_ok=True)
        proxy = {"remoteurl": remote_url}
        if username is not None and password is not None:
            proxy |= {"username": username, "password": password}
        registry = cls(workdir, kind="pull-through", proxy=proxy)
        if trust is not None:
            registry.env = {"SSL_CERT_FILE": str(trust)}
        return registry

    # -- addresses -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{LOOPBACK}:{self.port}", "secret": self._secret},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self._auth is not None:
            config["auth"] = self._auth
        if self._proxy is not None:
            config["proxy"] = self._proxy
        if self.tls is not None:
            config["http"]["tls"] = {"certificate": str(self.tls.cert), "key": str(self.tls.key)}
        return config

    def _stderr_path(self, generation: int) -> Path:
        return self.workdir / f"registry.{generation}.log"

    def start(self) -> Self:
        """Start (or start again, on the same port) and wait for ``GET /v2/``."""
        if self.running:
            return self
        binary = require_binary("docker-registry")
        fixed_port = self._port is not None
        for _attempt in range(3):
            if not fixed_port:
                self._port = free_port()
            # JSON is a subset of YAML: no YAML library needed.
            self.config_path.write_text(json.dumps(self._config(), indent=2))
            self._generation += 1
            log_path = self._stderr_path(self._generation)
            with log_path.open("wb") as log:
                self._proc = popen(
                    [binary, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    cwd=self.workdir,
                    env={**os.environ, **self.env} if self.env else None,
                )
            try:
                wait_for_http(
                    f"{self.url}/v2/",
                    accept=lambda status: status in (200, 401),
                    timeout=START_TIMEOUT,
                    alive=self._death,
                    what=f"docker-registry ({self.kind})",
                    ca=self.tls.ca if self.tls else None,
                )
                return self
            except PeerError:
                self.stop()
                if fixed_port or "address already in use" not in log_path.read_text():
                    raise
        raise PeerError("docker-registry: no free port after 3 attempts")

    def _death(self) -> str | None:
        if self._proc is None or self._proc.poll() is None:
            return None
        log = self._stderr_path(self._generation).read_text(errors="replace")
        return f"exit code {self._proc.returncode}\n{log[-4000:]}"

    def stop(self) -> None:
        """Stop the process; storage and port are kept for ``start()``."""
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what it served ----------------------------------------------------------

    def log_lines(self) -> list[dict[str, Any]]:
        """Every JSON log line of every run so far."""
        entries: list[dict[str, Any]] = []
        for generation in range(1, self._generation + 1):
            path = self._stderr_path(generation)
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return entries

    def requests(self) -> list[RegistryRequest]:
        """Requests the registry completed, in order (across restarts)."""
        return [
            RegistryRequest(
                method=str(e["http.request.method"]),
                uri=str(e.get("http.request.uri", "")),
                status=int(e.get("http.response.status", 0)),
                written=int(e.get("http.response.written", 0)),
                useragent=str(e.get("http.request.useragent", "")),
            )
            for e in self.log_lines()
            if str(e.get("msg", "")).startswith("response completed") and "http.request.method" in e
        ]

    def refusals(self) -> list[str]:
        """The URIs of requests refused for want of authorization, in order: distribution
        logs those as ``error authorizing context: <why>``, not as completed requests."""
        return [
            str(e.get("http.request.uri", ""))
            for e in self.log_lines()
            if str(e.get("msg", "")).startswith("error authorizing context")
        ]

    def blob_gets(self, *, status: int | None = 200) -> list[RegistryRequest]:
        """``GET …/blobs/sha256:…`` requests (by default only those answered 200)."""
        return [
            r
            for r in self.requests()
            if r.method == "GET" and r.is_blob and (status is None or r.status == status)
        ]

    def log_barrier(self, timeout: float = 5.0) -> None:
        """Return once every request completed so far is in ``requests()``.

        distribution writes a request's log line just after answering it; a marked
        ``GET /v2/`` sent now is logged after all of them, so once it shows up the
        log is complete up to this moment.  (With ``auth.token`` the marker is answered
        401 and logged as a refusal: its line is looked for in every line.)
        """
        marker = f"/v2/?log-barrier={secrets.token_hex(6)}"
        http_request("GET", f"{self.url}{marker}")
        deadline = time.monotonic() + timeout
        while not any(e.get("http.request.uri") == marker for e in self.log_lines()):
            if time.monotonic() > deadline:
                raise PeerError(f"docker-registry did not log {marker} within {timeout}s")
            time.sleep(0.02)

    # -- content without an image ----------------------------------------------------

    def push_blob(self, repository: str, data: bytes, *, timeout: float = 60.0) -> str:
        """Upload ``data`` as a blob of ``repository`` (POST, then one PUT with the
        digest: a monolithic upload); return its digest.  Needs no authentication,
        so use it on a ``plain`` registry."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        started = http_request("POST", f"{self.url}/v2/{repository}/blobs/uploads/")
        location = started.header("Location")
        if started.status != 202 or not location:
            raise PeerError(f"upload to {repository} not started: {started.status}")
        if location.startswith("/"):
            location = f"{self.url}{location}"
        separator = "&" if "?" in location else "?"
        done = http_request(
            "PUT",
            f"{location}{separator}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=timeout,
        )
        if done.status != 201:
            raise PeerError(f"upload of {digest} to {repository} failed: {done.status}")
        return digest
