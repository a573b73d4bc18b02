"""A blob through the fleet: where a node that lacks a blob takes it from, when it is
one of a fleet (`[cluster]`, `proxyd.fleet`). The directory (`proxyd.directory`)
answers, atomically for the whole fleet:

- `fetch`: this node is the fleet's one fetch from the upstream chain (it keeps the
  right while it fetches: `Directory.fetching`);
- `peer`: stream it from that node, which holds it or is receiving it itself;
- `upstream` (the peers that could send it failed this node) or `alone` (Redis is
  unreachable): the chain, as a proxyd without a fleet.

Whatever the source, the bytes go into the same `Download` a chain's fetch fills: a
local client joins it and streams as bytes arrive, its last byte waits for the
digest, and a deeper peer may stream it from this node meanwhile
(`proxyd.server.peers`). A peer that fails (refused, busy, missing, dead, slow, or
wrong bytes, counted and logged by `proxyd.peers`) is avoided and the directory is
asked again, for at most `MAX_PEERS` peers no deeper in the tree than the one that
failed (a deeper one may be fed by this node), then the chain. A stream that broke
goes on from the byte it reached (`Range`, from that peer or the chain); after wrong
bytes the download starts again from its first byte (`Download.restart`): a reader
that had bytes of it is cut short, unless the peer sent its stored copy, whose bytes
are withheld until verified (`Download.withhold`: they come at the node network's
pace, so the wait is short). Nothing unverified is ever stored: the digest is checked at
the end, whoever sent the bytes.

A peer's word counts for nothing about a repository: before a node streams a blob
from a peer into a repository, a confirmer (the upstream, `Namespace.confirmers`)
must have said that repository holds it (the `confirm` the puller passes: a `HEAD`,
unless linked already). So peers save the upstream its blob GETs, never its say.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import structlog

from proxyd.directory import Directory
from proxyd.download import Download
from proxyd.errors import BlobUnknown, DigestMismatch, ProxydError, UpstreamError
from proxyd.fleetmanifests import FleetManifests
from proxyd.hosts import Capability, RegistryHost, Target
from proxyd.metrics import Metrics
from proxyd.peers import PeerClient, PeerFailed
from proxyd.reference import Digest
from proxyd.store import BlobStore
from proxyd.upstream import UpstreamClient

log = structlog.get_logger("proxyd.fleetpull")

CACHE_HEADER = "X-Proxyd-Cache"  # a peer's "hit": its stored (or verified) copy
MAX_PEERS = 3  # peers one download tries before it goes to the upstream chain

# The chain's fetch of a whole blob into a download (the puller's): the host that served it.
ChainFetch = Callable[[Target, Download], Awaitable[RegistryHost]]
Confirm = Callable[[Target, Digest], Awaitable[None]]

_PEER_TROUBLE = (PeerFailed, UpstreamError, aiohttp.ClientError, TimeoutError)
_CONFIRM_TROUBLE = (ProxydError, aiohttp.ClientError, TimeoutError, OSError)


class FleetPulls:
    """The fleet's part in a node's downloads: which source fills each, and the
    directory told what this node holds."""

    def __init__(
        self,
        directory: Directory,
        peers: PeerClient,
        upstream: UpstreamClient,
        store: BlobStore,
        *,
        metrics: Metrics,
    ) -> None:
        self.directory = directory
        self.peers = peers
        self.upstream = upstream
        self.store = store
        self.metrics = metrics
        # Manifests by digest: the upstream's HEAD, a peer's body (proxyd.fleetmanifests).
        self.manifests = FleetManifests(directory, peers, upstream, metrics=metrics)

    async def fetch(
        self, target: Target, download: Download, *, chain: ChainFetch, confirm: Confirm
    ) -> RegistryHost:
        """Fill `download` until its digest is verified, from the source the directory
        names (see the module's docstring); the host that sent its last bytes."""
        digest = download.digest
        avoid: list[str] = []
        depth: int | None = None  # this node's depth in the blob's tree, once fed by a peer
        keep = False  # the bytes so far may be kept (a stream broke: nothing was wrong)
        confirmed = False
        while True:
            source = await self.directory.source(digest, avoid)
            if source.kind == "fetch":
                async with self.directory.fetching(digest):
                    return await self._chain(target, download, chain, keep=keep)
            if source.kind != "peer" or source.peer is None:
                return await self._chain(target, download, chain, keep=keep)
            peer = source.peer
            # After a failure, no peer deeper than the one that failed: a deeper one may
            # be fed by this node (which then waits on it while it waits on this node).
            deeper = depth is not None and source.depth > depth
            if len(avoid) >= MAX_PEERS or deeper:
                await self.directory.done_with(digest, peer)
                return await self._chain(target, download, chain, keep=keep)
            if not confirmed:
                try:
                    await confirm(target, digest)
                except BlobUnknown:  # the repository lacks it: no source may serve it
                    await self.directory.done_with(digest, peer)
                    raise
                except _CONFIRM_TROUBLE as exc:  # the confirmer failed: the chain decides
                    log.info("fleet.unconfirmed", digest=str(digest), error=str(exc))
                    await self.directory.done_with(digest, peer)
                    return await self._chain(target, download, chain, keep=False)
                confirmed = True
            try:
                return await self._from_peer(peer, download, keep=keep)
            except DigestMismatch as exc:
                self.peers.mismatch(peer, exc)
                keep = False
            except _PEER_TROUBLE as exc:
                # PeerFailed: the stream (if any) broke, its bytes so far right as far
                # as anyone knows, so they are kept; a short body or another range: not.
                keep = isinstance(exc, PeerFailed)
                log.info("fleet.peer_skipped", peer=peer, digest=str(digest), error=str(exc))
            finally:
                await self.directory.done_with(digest, peer)
            avoid.append(peer)
            depth = source.depth

    async def _from_peer(self, peer: str, download: Download, *, keep: bool) -> RegistryHost:
        """Stream from `peer` into `download`, from the byte it reached if `keep`."""
        if not keep:
            await _afresh(download)
        offset = download.received
        async with self.peers.open(peer, download.digest, offset=offset) as up:
            response = up.response
            if offset:
                expected = f"bytes {offset}-"
                if not response.headers.get("Content-Range", "").startswith(expected):
                    raise UpstreamError(f"peer {peer} sent another range than {expected}")
            else:
                download.size = response.content_length
                download.open(self.store)
            download.host, download.peer = up.host.host, peer
            # A stored copy arrives at the node network's pace: nothing is released
            # before it is verified, so wrong bytes cut no reader (one in flight is
            # streamed as it arrives: its pace is the upstream's).
            download.withhold = download.withhold or response.headers.get(CACHE_HEADER) == "hit"
            download.answer()
            received = self.metrics.peer_received_bytes
            async for chunk in up.chunks():
                received.inc(len(chunk))
                await download.write(chunk)
            await download.verify()  # in the block: a mismatch is this peer's
        self.metrics.upstream_saved_bytes.inc(download.received - offset)
        log.info("fleet.from_peer", peer=peer, digest=str(download.digest), offset=offset)
        return up.host

    async def _chain(
        self, target: Target, download: Download, chain: ChainFetch, *, keep: bool
    ) -> RegistryHost:
        """The upstream chain: on from the byte reached when `keep` and the chain
        honours `Range`, else the whole blob afresh."""
        download.peer = None
        if keep and download.received:
            host = await self._resume(target, download)
            if host is not None:
                return host
        await _afresh(download)
        return await chain(target, download)

    async def _resume(self, target: Target, download: Download) -> RegistryHost | None:
        """The rest of the blob from the chain with `Range`; None (nothing written)
        when the host that answered sends another range or the whole blob."""
        offset = download.received
        async with self.upstream.request(
            target.namespace,
            Capability.PULL,
            "GET",
            target.repository,
            f"blobs/{download.digest}",
            headers=[("Range", f"bytes={offset}-")],
        ) as up:
            content_range = up.response.headers.get("Content-Range", "")
            if up.response.status != 206 or not content_range.startswith(f"bytes {offset}-"):
                return None
            download.host = up.host.host
            async for chunk in up.chunks():
                await download.write(chunk)
            await download.verify()
        log.info("fleet.resumed_upstream", digest=str(download.digest), offset=offset)
        return up.host

    async def stored(self, digest: Digest) -> None:
        """The blob is in this node's store: peers may take it from here."""
        await self.directory.holding(digest)

    async def dropped(self, digest: Digest) -> None:
        """This node has the blob no more (its download failed, or it was evicted)."""
        await self.directory.dropped(digest)


async def _afresh(download: Download) -> None:
    """A download about to take the blob from its first byte: anything of an earlier
    source goes (`Download.restart`)."""
    if download.writer is not None or download.received:
        await download.restart()
