"""Blobs from peers of the fleet: a request to another node's peer endpoint
(`/_proxyd/peers/blobs/<digest>`, served by `proxyd.server.peers`) with the fleet's
secret, and the bytes verified against the digest as every byte proxyd keeps is, so
a peer can never inject content, only fail.

A peer is a pull-only host: `peer_host` describes it as a `RegistryHost` (a mirror,
with the `pull` capability alone, its API root the peer endpoint), and `open` answers
with the same `Upstream` a chain's request gives, so a download can take its bytes
from a peer or from the upstream alike. A peer that fails (refused, busy, missing,
5xx, a timeout, a broken connection) is `PeerFailed`, counted in
`proxyd_peer_failures_total` by reason, for the caller to try the next source. The
bytes go into the node's own `Download` (`proxyd.fleetpull`), which verifies them;
wrong ones are `DigestMismatch` there, counted here (`mismatch`, reason `digest`) and
logged with the peer's address, and nothing of them is kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
import structlog

from proxyd import clienterrors
from proxyd.errors import DigestMismatch, UpstreamError
from proxyd.hosts import Capability, RegistryHost
from proxyd.metrics import Metrics
from proxyd.peergate import authorization
from proxyd.reference import Digest
from proxyd.upstream import Upstream

log = structlog.get_logger("proxyd.peers")

PEER_ROOT = "/_proxyd/peers"  # below it: blobs/<digest>
CONNECT_TIMEOUT = 2.0  # seconds: a peer is on the same network, or it is no help
READ_TIMEOUT = 10.0  # seconds without a byte: a peer receiving a blob is itself fed


class PeerFailed(UpstreamError):
    """A peer could not send the blob: the next source is tried."""

    def __init__(self, peer: str, reason: str, message: str) -> None:
        super().__init__(f"peer {peer}: {message}")
        self.peer = peer
        self.reason = reason


def peer_host(
    url: str, *, connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT
) -> RegistryHost:
    """The peer at `url` (its advertised origin) as a pull-only host of a chain."""
    parts = urlsplit(url)
    return RegistryHost(
        scheme=parts.scheme,
        host=parts.netloc,
        path=PEER_ROOT,
        capabilities=Capability.PULL,
        is_mirror=True,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )


class PeerClient:
    """Owns the connection pool to peers (apart from the upstream's: peers are few,
    near, and never get an upstream's credentials)."""

    def __init__(
        self,
        secret: bytes,
        *,
        metrics: Metrics,
        user_agent: str = "proxyd",
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self._authorization = authorization(secret)
        self.metrics = metrics
        self.user_agent = user_agent
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PeerClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, limit_per_host=8),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,  # peers are reached directly, never through a proxy
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @asynccontextmanager
    async def open(self, peer: str, digest: Digest, *, offset: int = 0) -> AsyncIterator[Upstream]:
        """The peer's answer for `digest` from byte `offset` (its body unread: whoever
        reads it counts the bytes in `proxyd_peer_received_bytes_total`), or PeerFailed.
        A body that breaks or stalls is PeerFailed too."""
        assert self._session is not None, "use PeerClient as an async context manager"
        host = peer_host(peer, connect_timeout=self.connect_timeout, read_timeout=self.read_timeout)
        headers = {"Authorization": self._authorization, "User-Agent": self.user_agent}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=host.connect_timeout, sock_read=host.read_timeout
        )
        try:
            response = await self._session.get(
                host.url(f"blobs/{digest}"),
                headers=headers,
                allow_redirects=False,
                timeout=timeout,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(peer, digest, *_broken(exc)) from None
        try:
            wanted = 206 if offset else 200
            if response.status != wanted:
                raise self._failed(peer, digest, *_refused(response.status))
            yield Upstream(host, response, [])
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(peer, digest, *_broken(exc)) from None
        finally:
            response.release()

    def mismatch(self, peer: str, exc: DigestMismatch) -> None:
        """A peer sent bytes that are not the digest's: counted and logged with its
        address (whoever verified them calls this)."""
        self.metrics.peer_failures.labels("digest").inc()
        log.warning("peer.digest_mismatch", peer=peer, expected=exc.expected, actual=exc.actual)

    def _failed(self, peer: str, digest: Digest, reason: str, message: str) -> PeerFailed:
        self.metrics.peer_failures.labels(reason).inc()
        log.info("peer.failed", peer=peer, digest=str(digest), reason=reason, error=message)
        return PeerFailed(peer, reason, message)


def _refused(status: int) -> tuple[str, str]:
    if status in (401, 403):
        return "refused", f"refused the fleet's secret ({status})"
    if status == 404:
        return "missing", "holds no such blob (404)"
    if status == 429:
        return "busy", "streams this blob to as many peers as it may (429)"
    return "unavailable", f"answered {status}"


def _broken(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, TimeoutError):
        return "timeout", "timed out"
    return "connection", clienterrors.describe(exc)
