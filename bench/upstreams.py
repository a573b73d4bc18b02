"""The upstreams every workload measures against, all real, all on 127.0.0.1.

- ``plain``: distribution with no authentication.
- ``tls``: a second distribution serving the plain one's storage over HTTPS, with a
  throw-away CA's certificate (``ca``): what a blob costs over TLS (the big blobs).
- ``token``: distribution with token authentication (ES256 JWTs from the harness's
  token server), reached through a relay that answers ``/token`` too, so the registry
  and its realm share one address (drayage requires that). Everyone, the direct
  client included, pulls through that same relay, so the ratios stay fair.
- ``slow``: the plain registry behind a relay that sends each body at a fixed rate.
- ``crowd``: the plain registry behind a paced relay that counts the GETs it relays.
- ``counted``: the plain registry behind a relay that only counts (the tag workload).
- ``hop``: not an upstream of a proxy but a stand-in for one: a relay that only moves
  bytes, in front of ``slow``, for what one more process on the way costs here.

``Upstream`` is what a proxy needs to know about one of them: the origin, the
credentials (if any), the CA to trust (if https), and the relay to ask for request
counts (if any).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.procs import spawn
from tests.peers import LOOPBACK, PeerError, free_port, stop_process, wait_for_http
from tests.peers.registry import TOKEN_SERVICE, Registry, TLSFiles
from tests.peers.tokenserver import TokenServer

USER, PASSWORD = "alice", "wonderland"


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str  # http://127.0.0.1:PORT (https:// with `ca`)
    creds: tuple[str, str] | None = None
    relay: RelayProcess | None = None
    ca: Path | None = None  # the CA of an https upstream's certificate

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def creds_text(self) -> str | None:
        return f"{self.creds[0]}:{self.creds[1]}" if self.creds else None


class RelayProcess:
    """``python -m bench.relay`` as a child process; see bench/relay.py."""

    def __init__(
        self,
        workdir: Path,
        target: str,
        *,
        rate: float = 0.0,
        total_rate: float = 0.0,
        token_target: str | None = None,
        port: int = 0,
        max_seconds: float = 3600.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "relay.log"
        argv = [sys.executable, "-m", "bench.relay", "--target", target, "--rate", str(rate)]
        argv += ["--total-rate", str(total_rate)]
        argv += ["--port", str(port), "--max-seconds", str(max_seconds)]
        if token_target:
            argv += ["--token-target", token_target]
        self._proc = spawn(argv, log=self.log)
        try:
            self.port = self._wait_for_port()
        except BaseException:
            self.stop()
            raise
        self.url = f"http://{LOOPBACK}:{self.port}"

    def _wait_for_port(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            for line in text.splitlines():
                if line.startswith("LISTENING "):
                    return int(line.split()[1])
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise PeerError(f"relay did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def counts(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.url}/_relay/stats", timeout=5) as resp:  # noqa: S310
            return {str(k): int(v) for k, v in json.loads(resp.read()).items()}

    def body_bytes(self) -> int:
        """Bytes of the response bodies it relayed so far: what crossed the link."""
        with urllib.request.urlopen(f"{self.url}/_relay/bytes", timeout=5) as resp:  # noqa: S310
            return int(json.loads(resp.read())["responses"])

    def gets(self, suffix: str) -> int:
        """How many GETs of a path ending in ``suffix`` it relayed so far."""
        return self.count("GET", suffix)

    def count(self, method: str, suffix: str) -> int:
        """How many requests of ``method`` for a path ending in ``suffix`` it relayed."""
        return sum(
            n
            for key, n in self.counts().items()
            if key.startswith(f"{method} ") and key.endswith(suffix)
        )

    def stop(self) -> None:
        stop_process(self._proc, grace=3)


class Upstreams(contextlib.ExitStack):
    """Starts every upstream on enter; stops all of them on exit, whatever happened."""

    def __init__(self, workdir: Path, *, slow_rate: float, crowd_rate: float) -> None:
        super().__init__()
        self.workdir = workdir
        self.slow_rate = slow_rate
        self.crowd_rate = crowd_rate

    def start(self) -> Upstreams:
        self.plain_registry = Registry.plain(self.workdir / "plain")
        self.callback(self.plain_registry.stop)  # first: it may be interrupted while starting
        self.plain_registry.start()
        self.plain = Upstream("plain", self.plain_registry.url)
        # The same registry's storage served over HTTPS (a test CA's certificate).
        tls = TLSFiles.issue(self.workdir / "tls" / "pki")
        over_tls = Registry.over_tls(self.workdir / "tls", tls, storage=self.plain_registry.storage)
        self.callback(over_tls.stop)
        over_tls.start()
        self.tls = Upstream("tls", over_tls.url, ca=tls.ca)

        tokens = TokenServer().start()
        self.callback(tokens.stop)
        front_port = free_port()
        front_url = f"http://{LOOPBACK}:{front_port}"
        self.token_registry = _token_registry(self.workdir / "token", tokens, f"{front_url}/token")
        self.callback(self.token_registry.stop)
        self.token_registry.start()
        front = RelayProcess(
            self.workdir / "front",
            self.token_registry.url,
            token_target=tokens.url,
            port=front_port,
        )
        self.callback(front.stop)
        wait_for_http(f"{front_url}/v2/", accept=lambda s: s == 401, timeout=10, what="token front")
        self.token = Upstream("token", front_url, (USER, PASSWORD), front)

        slow = RelayProcess(self.workdir / "slow", self.plain.url, rate=self.slow_rate)
        self.callback(slow.stop)
        self.slow = Upstream("slow", slow.url, relay=slow)
        hop = RelayProcess(self.workdir / "hop", slow.url)
        self.callback(hop.stop)
        self.hop = Upstream("hop", hop.url, relay=hop)
        crowd = RelayProcess(self.workdir / "crowd", self.plain.url, rate=self.crowd_rate)
        self.callback(crowd.stop)
        self.crowd = Upstream("crowd", crowd.url, relay=crowd)
        counted = RelayProcess(self.workdir / "counted", self.plain.url)
        self.callback(counted.stop)
        self.counted = Upstream("counted", counted.url, relay=counted)
        return self


def _token_registry(workdir: Path, tokens: TokenServer, realm: str) -> Registry:
    """distribution with token auth whose realm is ``realm`` (the front relay)."""
    workdir.mkdir(parents=True, exist_ok=True)
    bundle = tokens.write_rootcertbundle(workdir / "token-signer.pem")
    auth = {
        "token": {
            "realm": realm,
            "service": TOKEN_SERVICE,
            "issuer": tokens.issuer,
            "rootcertbundle": str(bundle),
        }
    }
    registry = Registry(workdir, kind="token", auth=auth)
    registry.users = dict(tokens.policy.users)
    registry.token_service = TOKEN_SERVICE
    return registry
