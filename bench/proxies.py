"""The proxies under test, each started on an empty cache in front of one upstream.

- ``proxyd``: ``python -m proxyd serve --config … --listen … --cache-dir …
  --log-format json`` (the harness's ``ProxydProcess``), the upstream configured as
  a namespace that is also the default, so ``HOST/bench/app:v1`` pulls through it.
- ``distribution``: ``docker-registry`` with ``proxy.remoteurl`` (the harness's
  ``Registry.pull_through``).
- ``proxyd-before`` (``--baseline CHECKOUT``): proxyd run from another checkout with
  that checkout's venv, e.g. a worktree of main, for a before/after in one run.
- ``drayage``: the upstream configured as its ``docker_io`` upstream, which drayage
  uses for names without a registry prefix. Two-component names (``bench/app``)
  keep it from rewriting them to ``library/NAME``.

``Proxyd(cluster={...})`` is a node of a fleet: the mapping is its ``[cluster]``
table, and it is told its own URL as ``advertise`` (``PROXYD_CLUSTER__ADVERTISE``).

``Proxy.start`` returns a ``RunningProxy``: where it listens, the PID that serves
(for memory and profiles), and how to stop it. A proxy that is not installed says
so in ``unavailable()``, and its rows are reported as skipped.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.procs import listening_pid, spawn
from bench.upstreams import Upstream
from tests.peers import LOOPBACK, PeerError, free_port, stop_process, wait_for_http
from tests.peers.proxyd import Namespace, ProxydProcess, proxyd_config
from tests.peers.registry import Registry

REPOSITORY = "bench/app"
START_TIMEOUT = 60.0  # seconds: sixteen proxyds starting at once share two CPUs


@dataclass
class RunningProxy:
    name: str
    host: str  # 127.0.0.1:PORT
    pid: int
    _stop: Callable[[], None]
    prefetch: Callable[[str], None] | None = None  # `proxyd prefetch REF` into its cache
    cache_dir: Path | None = None  # proxyd's store (kept after `stop`; `running` removes it)

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        self._stop()


class Proxy:
    name = "?"

    def unavailable(self) -> str | None:
        """Why this proxy cannot run here, or None."""
        return None

    def cannot_reach(self, upstream: Upstream) -> str | None:
        """Why this proxy cannot fetch from ``upstream`` (though it runs), or None."""
        return None

    def start(self, upstream: Upstream, workdir: Path) -> RunningProxy:
        raise NotImplementedError


class _CheckoutProxyd(ProxydProcess):
    """proxyd imported from another checkout, run by that checkout's Python."""

    def __init__(
        self, checkout: Path, config_toml: str, tmp_path: Path, *, advertise: bool = False
    ) -> None:
        super().__init__(config_toml, tmp_path, advertise=advertise)
        self.checkout = checkout

    def argv(self) -> list[str]:
        python = self.checkout / ".venv" / "bin" / "python"
        return [str(python), *super().argv()[1:]]

    def _env(self) -> dict[str, str]:
        return super()._env() | {"PYTHONPATH": str(self.checkout)}


class Proxyd(Proxy):
    name = "proxyd"

    def __init__(
        self,
        *,
        tag_ttl: float | None = None,
        cluster: Mapping[str, Any] | None = None,
        checkout: Path | None = None,
    ) -> None:
        self.tag_ttl = tag_ttl  # None: proxyd's default (60 s)
        self.cluster = cluster  # a [cluster] table (without advertise): a fleet's node
        self.checkout = checkout  # another checkout's proxyd (proxyd-before)
        if checkout is not None:
            self.name = "proxyd-before"

    def unavailable(self) -> str | None:
        if self.checkout is not None and not (self.checkout / ".venv" / "bin" / "python").exists():
            return f"{self.checkout} has no .venv (make .venv/.installed-dev there)"
        return None

    def start(self, upstream: Upstream, workdir: Path) -> RunningProxy:
        config = proxyd_config(
            default_namespace=upstream.host,
            namespaces=[
                Namespace(
                    upstream.host,
                    upstream.url,
                    tag_ttl=self.tag_ttl,
                    ca=(str(upstream.ca),) if upstream.ca else (),
                )
            ],
            credentials={upstream.host: upstream.creds} if upstream.creds else None,
            settings={"cluster": self.cluster} if self.cluster else None,
        )
        advertise = self.cluster is not None  # a fleet's node is told its own URL
        proc = (
            ProxydProcess(config, workdir, advertise=advertise)
            if self.checkout is None
            else _CheckoutProxyd(self.checkout, config, workdir, advertise=advertise)
        )
        try:
            proc.start(timeout=START_TIMEOUT)
        except pytest.fail.Exception as exc:  # the harness reports start failures this way
            raise PeerError(str(exc)) from None
        except BaseException:  # Ctrl-C while it starts: the harness would leave it running
            proc.stop()
            raise

        def stop() -> None:
            proc.stop()

        def prefetch(ref: str) -> None:
            proc.cli("prefetch", "--cache-dir", str(proc.cache_dir), "--log-format", "json", ref)

        return RunningProxy(
            self.name, proc.host, listening_pid(proc.port), stop, prefetch, proc.cache_dir
        )


class DistributionProxy(Proxy):
    name = "distribution"

    def start(self, upstream: Upstream, workdir: Path) -> RunningProxy:
        user, password = upstream.creds or (None, None)
        registry = Registry.pull_through(
            workdir, upstream.url, username=user, password=password, trust=upstream.ca
        )
        try:
            registry.start()
        except BaseException:  # the harness stops it only on its own errors
            registry.stop()
            raise
        return RunningProxy(self.name, registry.host, listening_pid(registry.port), registry.stop)


class Drayage(Proxy):
    name = "drayage"

    def binary(self) -> str | None:
        beside = Path(sys.executable).parent / "drayage"
        return str(beside) if beside.exists() else shutil.which("drayage")

    def unavailable(self) -> str | None:
        if self.binary() is None:
            return "drayage is not installed (pip install drayage did not succeed)"
        return None

    def cannot_reach(self, upstream: Upstream) -> str | None:
        # Its rustls verifies against the webpki-roots built into the binary (their
        # names are in it; no /etc/ssl path, no rustls-native-certs): a test CA cannot
        # be added, by SSL_CERT_FILE or otherwise, and every HTTPS fetch is a 502.
        if upstream.ca is not None:
            return "drayage trusts only the roots built into it, not a test CA"
        return None

    def start(self, upstream: Upstream, workdir: Path) -> RunningProxy:
        binary = self.binary()
        if binary is None:
            raise PeerError(self.unavailable() or "drayage missing")
        workdir.mkdir(parents=True, exist_ok=True)
        cache = workdir / "cache"
        cache.mkdir(exist_ok=True)  # drayage does not create it
        port = free_port()
        lines = [
            f'listen = "{LOOPBACK}:{port}"',
            f'cache_dir = "{cache}"',
            "[upstreams.docker_io]",
            f'registry = "{upstream.url}"',
        ]
        if upstream.creds:
            lines += [f'username = "{upstream.creds[0]}"', f'password = "{upstream.creds[1]}"']
        config = workdir / "drayage.toml"
        config.write_text("\n".join(lines) + "\n")
        proc = spawn([binary, "serve", "--config", str(config)], log=workdir / "drayage.log")

        def died() -> str | None:
            if proc.poll() is None:
                return None
            return (workdir / "drayage.log").read_text(errors="replace")[-3000:]

        try:
            wait_for_http(
                f"http://{LOOPBACK}:{port}/v2/",
                accept=lambda s: s == 200,
                timeout=15,
                alive=died,
                what="drayage",
            )
        except BaseException:
            stop_process(proc, grace=3)
            raise
        return RunningProxy(
            self.name, f"{LOOPBACK}:{port}", proc.pid, lambda: stop_process(proc, grace=5)
        )


ALL: tuple[Proxy, ...] = (Proxyd(), DistributionProxy(), Drayage())


def by_name(names: list[str], *, baseline: Path | None = None) -> list[Proxy]:
    """The proxies named, and proxyd-before (right after proxyd) with a baseline."""
    known = {p.name: p for p in ALL}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown proxies {unknown}; choose from {sorted(known)}")
    chosen = [known[n] for n in names]
    if baseline is not None:
        at = chosen.index(known["proxyd"]) + 1 if "proxyd" in names else 0
        chosen.insert(at, Proxyd(checkout=baseline.resolve()))
    return chosen


@contextlib.contextmanager
def running(proxy: Proxy, upstream: Upstream, workdir: Path) -> Iterator[RunningProxy]:
    """``proxy`` on an empty cache in ``workdir``; stopped and its cache removed after."""
    shutil.rmtree(workdir, ignore_errors=True)
    started = proxy.start(upstream, workdir)
    try:
        yield started
    finally:
        started.stop()
        shutil.rmtree(workdir, ignore_errors=True)
