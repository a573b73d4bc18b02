"""proxyd itself, as a subprocess, the way a user runs it.

``ProxydProcess(config_toml, tmp_path).start()`` writes the configuration to a file
and runs::

    python -m proxyd serve --config FILE --listen 127.0.0.1:PORT \\
        --cache-dir DIR --log-format json

then waits until ``GET /v2/`` answers 200.  Its stderr (one JSON event a line) is
kept in a file: ``logs()`` parses it, ``access_log()`` keeps the ``request`` events.

The process gets a clean environment: no ``PROXYD_*`` variables from the host, a
``HOME`` of its own (so neither the host's settings nor ``~/.docker/config.json``
can change what a test sees), and this checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pytest

from tests.peers import (
    LOOPBACK,
    Completed,
    HttpResult,
    Listening,
    PeerError,
    free_port,
    http_request,
    run,
    stop_process,
    wait_for_http,
)
from tests.peers.children import popen

START_TIMEOUT = 15.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Nothing listens on port 1 of the loopback: connecting there is refused at once.
CLOSED_PORT_URL = f"http://{LOOPBACK}:1"
LogEvent = dict[str, Any]


class ProxydProcess(Listening):
    """One proxyd daemon; see the module docstring."""

    peer = "proxyd"

    def __init__(
        self,
        config_toml: str,
        tmp_path: Path,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cache_dir: Path | None = None,
        tls: ssl.SSLContext | None = None,
        advertise: bool = False,
    ) -> None:
        """``tls``: proxyd serves HTTPS (its ``extra_args`` give ``--tls-cert`` …);
        ``url`` is then ``https://…`` and readiness is awaited with this client context.
        ``advertise``: a fleet node (``[cluster]``), told its own URL as its peers
        reach it (``PROXYD_CLUSTER__ADVERTISE``), which is known once its port is."""
        self.workdir = tmp_path
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.config_path = tmp_path / "proxyd.toml"
        self.config_path.write_text(config_toml)
        self.cache_dir = cache_dir or tmp_path / "cache"
        self.stderr_path = tmp_path / "proxyd.stderr"
        self.stdout_path = tmp_path / "proxyd.stdout"
        self.extra_args = tuple(extra_args)
        self._extra_env = dict(env or {})
        self.tls = tls
        self.advertise = advertise
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}"

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    # -- lifecycle -------------------------------------------------------------

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "proxyd",
            "serve",
            "--config",
            str(self.config_path),
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--cache-dir",
            str(self.cache_dir),
            "--log-format",
            "json",
            *self.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROXYD_")}
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env |= {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
        env |= {"XDG_CONFIG_HOME": str(home / ".config"), "PYTHONUNBUFFERED": "1"}
        env.pop("DOCKER_CONFIG", None)
        # Import proxyd from this checkout whatever the state of the editable install
        # (one made before proxyd/__init__.py existed maps ``proxyd`` to a namespace
        # package, and ``python -m proxyd`` then fails outside the project root).
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        if self.advertise:
            env["PROXYD_CLUSTER__ADVERTISE"] = self.url
        return env | self._extra_env

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start proxyd and wait for ``GET /v2/`` to answer 200; fail with its stderr."""
        for _attempt in range(3):
            self._port = free_port()
            with self.stderr_path.open("ab") as err, self.stdout_path.open("ab") as out:
                self._proc = popen(
                    self.argv(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=self._env(),
                    cwd=self.workdir,
                )
            try:
                self._wait_ready(timeout)
                return self
            except PeerError as err:
                stderr = self.stderr_text()
                self.kill()
                if "address already in use" in stderr.lower():
                    continue
                pytest.fail(
                    f"proxyd did not start: {err}\n"
                    f"$ {' '.join(self.argv())}\n"
                    f"--- config ---\n{self.config_path.read_text()}\n"
                    f"--- stderr ---\n{stderr[-8000:]}",
                    pytrace=False,
                )
        pytest.fail("proxyd: no free port after 3 attempts", pytrace=False)

    def _wait_ready(self, timeout: float) -> None:
        """``GET /v2/`` answers 200: over plain HTTP, or over HTTPS with ``self.tls``."""
        if self.tls is None:
            wait_for_http(
                f"{self.url}/v2/",
                accept=lambda status: status == 200,
                timeout=timeout,
                alive=self._death,
                what="proxyd",
            )
            return
        url = f"{self.url}/v2/"
        deadline = time.monotonic() + timeout
        last: int | None = None
        while True:
            died = self._death()
            if died is not None:
                raise PeerError(f"proxyd exited before answering {url}:\n{died}")
            last = https_status(url, self.tls)
            if last == 200:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"proxyd did not answer {url} within {timeout}s (last {last})")
            time.sleep(0.05)

    def _death(self) -> str | None:
        if self._proc is None or self._proc.poll() is None:
            return None
        return f"exit code {self._proc.returncode}\n{self.stderr_text()[-4000:]}"

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM (then SIGKILL after ``grace``); return the exit code."""
        if self._proc is None:
            return None
        stop_process(self._proc, grace=grace)
        return self._proc.returncode

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload proxyd` sends it."""
        assert self._proc is not None and self._proc.poll() is None, "proxyd is not running"
        self._proc.send_signal(signal.SIGHUP)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """SIGSTOP for the block, then SIGCONT: a hung daemon, whose port still
        accepts connections (the kernel's backlog) but answers nothing."""
        assert self._proc is not None and self._proc.poll() is None, "proxyd is not running"
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what it said ----------------------------------------------------------

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> list[LogEvent]:
        """Every JSON event proxyd wrote to stderr (other lines are skipped)."""
        events = []
        for line in self.stderr_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def access_log(self) -> list[LogEvent]:
        """The ``event="request"`` entries, one per request proxyd answered."""
        return [e for e in self.logs() if e.get("event") == "request"]

    def wait_for_log(
        self, predicate: Callable[[list[LogEvent]], bool], timeout: float = 5.0
    ) -> list[LogEvent]:
        """Poll the access log until ``predicate`` holds (or ``timeout``); return it.

        A client may finish before proxyd has written the line for its last request.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self.access_log()
            if predicate(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(0.05)

    def wait_for_event(self, name: str, timeout: float = 15.0) -> list[LogEvent]:
        """Poll proxyd's log until an event called ``name`` is in it; return those."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.logs() if e.get("event") == name]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def describe_log(self, last: int = 40) -> str:
        """The tail of the access log, one request a line, for assertion messages."""
        rows = [
            f"{e.get('method')} {e.get('path')} ns={e.get('namespace')} host={e.get('host')} "
            f"-> {e.get('status')} cache={e.get('cache')}"
            for e in self.access_log()[-last:]
        ]
        return "\n".join(rows) or "(no request events)\n" + self.stderr_text()[-3000:]

    # -- its other commands, on the same settings --------------------------------

    def cli(self, *args: str, check: bool = True) -> Completed:
        """``python -m proxyd ARGS --config FILE --listen 127.0.0.1:PORT`` in proxyd's
        environment: a command such as ``init containerd`` sees the daemon's settings."""
        argv = [sys.executable, "-m", "proxyd", *args, "--config", str(self.config_path)]
        argv += ["--listen", self.host]
        return run(argv, timeout=30, env=self._env(), check=check, cwd=self.workdir)

    # -- talking to it directly ------------------------------------------------

    def request(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> HttpResult:
        return http_request(method, f"{self.url}{path}", headers=headers)


def https_status(url: str, context: ssl.SSLContext, timeout: float = 1.0) -> int | None:
    """The status of ``GET url`` over HTTPS on 127.0.0.1, or None when nothing answers
    (a refused handshake included)."""
    if not url.startswith(f"https://{LOOPBACK}:"):
        raise PeerError(f"refusing a request to {url!r}: tests only talk to {LOOPBACK}")
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (OSError, urllib.error.URLError):
        return None


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """A ``[namespaces.NS.host."URL"]`` table: a mirror tried before the server."""

    url: str
    capabilities: tuple[str, ...] = ("pull", "resolve")
    read_timeout: float | None = None


@dataclass(frozen=True)
class Namespace:
    """A ``[namespaces.NAME]`` table: the upstream ``server`` and its mirrors."""

    name: str
    server: str | None
    hosts: tuple[Host, ...] = ()
    tag_ttl: float | None = None  # seconds a resolved tag is fresh (proxyd's default: 60)
    allow_push: bool = False  # pushes (uploads, manifest PUT) through proxyd
    allow_delete: bool = False  # manifest and blob DELETE through proxyd
    ca: tuple[str, ...] = ()  # CA files trusted for the server (an https one)


def _toml_value(value: Any) -> str:
    if isinstance(value, Mapping):  # an inline table: ``cache = {backend = "redis"}``
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return f"{{{items}}}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | list | tuple):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    raise TypeError(f"no TOML form for {value!r}")


def _toml_key(key: str) -> str:
    return json.dumps(key)


def proxyd_config(
    *,
    default_namespace: str | None,
    namespaces: Sequence[Namespace] = (),
    credentials: Mapping[str, tuple[str, str]] | None = None,
    settings: Mapping[str, Any] | None = None,
    offline_docker_io: bool = True,
) -> str:
    """proxyd's TOML configuration; ``settings`` adds top-level keys (log_level, …;
    a mapping value is an inline table, e.g. ``cache={"backend": "redis"}``).

    proxyd's embedded defaults configure ``docker.io`` (Docker Hub).  Unless a test
    configures that namespace itself, it is pointed at a closed port on 127.0.0.1,
    so that a request proxyd routes there by mistake fails at once instead of
    leaving the machine.

    The text is parsed back with ``tomllib`` before it is returned, so a test never
    hands proxyd a file that is not TOML.
    """
    if offline_docker_io and all(ns.name != "docker.io" for ns in namespaces):
        namespaces = [*namespaces, Namespace("docker.io", CLOSED_PORT_URL)]
    lines = [f"# written by tests/peers/proxyd.py for {os.environ.get('PYTEST_CURRENT_TEST', '?')}"]
    if default_namespace is not None:
        lines.append(f"default_namespace = {_toml_value(default_namespace)}")
    for key, value in (settings or {}).items():
        lines.append(f"{key} = {_toml_value(value)}")
    for ns in namespaces:
        lines.append(f"\n[namespaces.{_toml_key(ns.name)}]")
        if ns.server is not None:
            lines.append(f"server = {_toml_value(ns.server)}")
        if ns.tag_ttl is not None:
            lines.append(f"tag_ttl = {_toml_value(ns.tag_ttl)}")
        if ns.ca:
            lines.append(f"ca = {_toml_value(ns.ca)}")
        for setting in ("allow_push", "allow_delete"):
            if getattr(ns, setting):
                lines.append(f"{setting} = true")
        for host in ns.hosts:
            lines.append(f"\n[namespaces.{_toml_key(ns.name)}.host.{_toml_key(host.url)}]")
            lines.append(f"capabilities = {_toml_value(host.capabilities)}")
            if host.read_timeout is not None:
                lines.append(f"read_timeout = {_toml_value(host.read_timeout)}")
    for registry, (username, password) in (credentials or {}).items():
        lines.append(f"\n[credentials.{_toml_key(registry)}]")
        lines.append(f"username = {_toml_value(username)}")
        lines.append(f"password = {_toml_value(password)}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    return text
