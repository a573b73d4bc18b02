"""A manifest by digest through the fleet: the upstream answers a `HEAD`, a peer that
holds the manifest sends the body. Docker Hub counts every manifest `GET` against the
pull limit and no `HEAD`, so a fleet asks it for each manifest's body once.

The `HEAD` (of the repository asked for, asked of its confirmers alone,
`Namespace.confirmers`, as a blob's confirmation is: a pull-only mirror's 200 would
put a peer's bytes into a repository nobody vouched for) is the repository's
confirmation and gives the media type and the size: the upstream's word, never a
peer's. A `404` is the answer (`ManifestUnknown`), whichever
peer holds the digest. The body then comes from a node the directory lists as
holding the digest (a few, at random: `Directory.some_holders`), through the peer
endpoint blobs take (`/_proxyd/peers/blobs/<digest>`: manifests are in the same
store by digest), read to at most the size the upstream gave (itself at most
`max_manifest_size`), and checked against the digest and that size; wrong bytes are
counted and logged with the peer's address (`PeerClient.mismatch`), as a blob's are.

Anything else (no holder, Redis unreachable, the `HEAD` refused or not answered
usefully, every peer tried failing) answers None: the puller then `GET`s it through
the chain as a proxyd without a fleet does. A registry that refuses `HEAD` with 405
is asked again as `GET` (`proxyd.retries`); that answer's body is taken as is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
import structlog

from proxyd.directory import Directory
from proxyd.errors import DigestMismatch, ManifestUnknown, ProxydError
from proxyd.hosts import Capability, Target
from proxyd.manifests import read_manifest, served_media_type
from proxyd.metrics import Metrics
from proxyd.peers import PeerClient, peer_host
from proxyd.reference import Digest
from proxyd.refusal import expect
from proxyd.upstream import UpstreamClient

log = structlog.get_logger("proxyd.fleetmanifests")

MAX_PEERS = 3  # holders one manifest tries before the chain's GET

_TROUBLE = (ProxydError, aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True)
class Fetched:
    """A manifest's body, its digest not yet checked (`Puller.commit_manifest` does),
    and who sent it (`host:port`): a peer, or the chain's host that answered the `HEAD`
    as a `GET`."""

    body: bytes
    media_type: str
    host: str


class FleetManifests:
    def __init__(
        self, directory: Directory, peers: PeerClient, upstream: UpstreamClient, *, metrics: Metrics
    ) -> None:
        self.directory = directory
        self.peers = peers
        self.upstream = upstream
        self.metrics = metrics

    async def fetch(
        self, target: Target, digest: Digest, accept: Iterable[str], *, limit: int
    ) -> Fetched | None:
        """The manifest from a peer once the upstream's `HEAD` confirmed it (see the
        module's docstring); None for the chain's `GET`. ManifestUnknown when the
        repository lacks it."""
        me = self.directory.me
        holders = [h for h in await self.directory.some_holders(digest, MAX_PEERS + 1) if h != me]
        if not holders:
            return None
        try:
            async with self.upstream.ask(
                target,
                Capability.RESOLVE,
                "HEAD",
                f"manifests/{digest}",
                accept=accept,
                hosts=target.namespace.confirmers(),
            ) as up:
                await expect(up, f"manifest {digest}", not_found=ManifestUnknown)
                headers = up.response.headers
                if up.response.method != "HEAD":  # a 405 asked again as GET: its body
                    body = await read_manifest(
                        up.chunks(),
                        length=up.response.content_length,
                        limit=limit,
                        source=f"from {up.host.host}",
                    )
                    return Fetched(
                        body, served_media_type(headers.get("Content-Type"), body), up.host.host
                    )
                size = up.response.content_length
                said = headers.get("Docker-Content-Digest")
                content_type = headers.get("Content-Type")
        except ManifestUnknown:
            raise
        except _TROUBLE as exc:
            log.info("fleet.manifest_head_failed", digest=str(digest), error=str(exc))
            return None
        if size is None or size > limit or (said is not None and said != str(digest)):
            log.info("fleet.manifest_head_unusable", digest=str(digest), size=size, said=said)
            return None
        for peer in holders[:MAX_PEERS]:
            sent = await self._from_peer(peer, digest, size)
            if sent is not None:
                self.metrics.upstream_saved_bytes.inc(len(sent))
                log.info("fleet.manifest_from_peer", peer=peer, digest=str(digest))
                return Fetched(sent, served_media_type(content_type, sent), _netloc(peer))
        return None

    async def _from_peer(self, peer: str, digest: Digest, size: int) -> bytes | None:
        """The peer's body of `digest` when it is `size` bytes and the digest's; None
        (counted, logged) when the peer fails or sends anything else."""
        try:
            async with self.peers.open(peer, digest) as up:
                body = await read_manifest(
                    up.chunks(),
                    length=up.response.content_length,
                    limit=size,
                    source=f"from peer {peer}",
                )
        except _TROUBLE as exc:
            log.info("fleet.peer_skipped", peer=peer, digest=str(digest), error=str(exc))
            return None
        self.metrics.peer_received_bytes.inc(len(body))
        if len(body) != size or not digest.matches(body):
            self.peers.mismatch(
                peer, DigestMismatch(str(digest), str(Digest.of(body, digest.algorithm)))
            )
            return None
        return body


def _netloc(peer: str) -> str:
    """The peer as a host is named in logs and metrics (`host:port`)."""
    return peer_host(peer).host
