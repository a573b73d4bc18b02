"""Content by digest: manifests and blobs named by their digest, which any host with
`pull` may serve, since proxyd verifies every byte against the name.

A stored copy is served only once a host trusted with the repository's names (one
with `resolve`, `Namespace.confirmers`) said that the repository holds it: a link in
the store, written only for verified content. A pull-only mirror may serve the bytes
(they are checked against the digest) but its word about a repository counts for
nothing: a blob it served is linked once a confirmer answers a `HEAD`, after the
bytes are out. Otherwise the content is fetched, verified and stored: a
blob through a `Download` shared by every request for its digest; a manifest
checked in memory, answered at once, and written to the store behind the answer
(while on its way there, this process answers it from memory). Manifests just
served stay in memory (`proxyd.memory`), so a hit reads no file. In a fleet, a
blob comes through `proxyd.fleetpull`, a manifest from a peer once the upstream
answered its `HEAD` (`proxyd.fleetmanifests`); every stored manifest is announced to
the directory, as a blob is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog

from proxyd import splicing
from proxyd.background import in_worker
from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.download import Download
from proxyd.errors import BlobUnknown, DigestMismatch, ManifestUnknown, ProxydError, UpstreamError
from proxyd.fleetpull import FleetPulls
from proxyd.hosts import Capability, Namespace, RegistryHost, Target
from proxyd.manifests import Manifest, read_manifest, served_media_type
from proxyd.memory import Key as MemoryKey
from proxyd.memory import ManifestMemory, RememberedManifest
from proxyd.metrics import Metrics
from proxyd.reference import Digest
from proxyd.refusal import expect
from proxyd.singleflight import SingleFlight
from proxyd.store import BlobStore
from proxyd.upstream import Upstream, UpstreamClient

log = structlog.get_logger("proxyd.puller")


@dataclass
class StoredBlob:
    digest: Digest
    path: Path
    size: int


@dataclass
class BlobHead:
    digest: Digest
    size: int | None
    host: str


@dataclass(frozen=True)
class Joined:
    """A download whose digest is verified, its file on the way into the store: the
    bytes are proxyd's already, so a request joining it is a hit."""

    download: Download


BlobAnswer = StoredBlob | Download | Joined | BlobHead


@dataclass(frozen=True)
class _Storing:
    media_type: str
    body: bytes
    removals: int  # the store's removal count when it was fetched


class Puller:
    def __init__(
        self,
        store: BlobStore,
        upstream: UpstreamClient,
        *,
        max_manifest_size: int,
        manifest_memory: int = 32 << 20,
        on_commit: Callable[[int], None] = lambda size: None,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        fleet: FleetPulls | None = None,
    ) -> None:
        self.store = store
        self.fleet = fleet  # with [cluster]: blobs and manifests through the fleet
        self.upstream = upstream
        self.max_manifest_size = max_manifest_size
        self.manifest_memory = ManifestMemory(store, manifest_memory, clock=clock.monotonic)
        self.on_commit = on_commit  # a blob of this size was stored (eviction watches)
        self.metrics = metrics or Metrics()
        self._flights: SingleFlight[Manifest] = SingleFlight(on_join=self.metrics.coalesced.inc)
        self._downloads: dict[Digest, Download] = {}
        self._splices = 0  # bodies being spliced now (at most splicing.MAX_SPLICES)
        self._storing: dict[MemoryKey, _Storing] = {}  # manifests on their way to the disk
        self._stores: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        # Manifests on their way to the disk are small: they are let finish.
        await asyncio.gather(*self._stores, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- manifests ----------------------------------------------------------------------

    async def manifest(self, target: Target, digest: Digest, accept: list[str]) -> Manifest:
        kept = self.remembered(target, digest) or self._stored_manifest(target, digest)
        if kept is not None:
            self.metrics.cache.labels("manifest", "hit").inc()
            body = kept.body
            return Manifest(digest, kept.media_type, len(body), body, "hit", None, kept.fresh_until)
        self.metrics.cache.labels("manifest", "miss").inc()
        key = ("manifest", target.namespace.name, target.repository, digest)
        return await self._flights.run(key, lambda: self._fetch_manifest(target, digest, accept))

    def remembered(self, target: Target, digest: Digest) -> RememberedManifest | None:
        """The manifest from memory, while it may be served without asking the store."""
        return self.manifest_memory.get(_memory_key(target, digest))

    def remember(self, target: Target, manifest: Manifest) -> None:
        """Keep a confirmed manifest in memory (a tag's answer: its link made or on its
        way to the store)."""
        self.manifest_memory.put(
            _memory_key(target, manifest.digest), manifest.media_type, manifest.body
        )

    def _stored_manifest(self, target: Target, digest: Digest) -> RememberedManifest | None:
        """The manifest from the store, or on its way there; remembered when found."""
        key = _memory_key(target, digest)
        storing = self._on_its_way(key)
        if storing is not None:
            return self.manifest_memory.put(key, storing.media_type, storing.body)
        media_type = self.store.linked(
            target.namespace.name, target.repository, digest, "_manifests"
        )
        body = self.store.read(digest) if media_type is not None else None
        if media_type is None or body is None:
            return None
        self.store.use(digest)
        return self.manifest_memory.put(key, media_type, body)

    async def _fetch_manifest(self, target: Target, digest: Digest, accept: list[str]) -> Manifest:
        if self.fleet is not None:  # the upstream's HEAD and a peer's body, if it can
            fetched = await self.fleet.manifests.fetch(
                target, digest, accept, limit=self.max_manifest_size
            )
            if fetched is not None:
                try:
                    self.commit_manifest(target, digest, fetched.body, fetched.media_type)
                except DigestMismatch:
                    self.metrics.digest_mismatches.labels(fetched.host).inc()
                    raise
                body = fetched.body
                return Manifest(digest, fetched.media_type, len(body), body, "miss", fetched.host)
        async with self.upstream.ask(
            target, Capability.PULL, "GET", f"manifests/{digest}", accept=accept
        ) as up:
            await expect(up, f"manifest {digest}", not_found=ManifestUnknown)
            body = await self.read_manifest(up)
            media_type = served_media_type(up.response.headers.get("Content-Type"), body)
        try:
            self.commit_manifest(target, digest, body, media_type)
        except DigestMismatch:
            self.metrics.digest_mismatches.labels(up.host.host).inc()
            raise
        return Manifest(digest, media_type, len(body), body, "miss", up.host.host)

    async def read_manifest(self, up: Upstream) -> bytes:
        """An upstream's manifest body, at most max_manifest_size bytes."""
        return await read_manifest(
            up.chunks(),
            length=up.response.content_length,
            limit=self.max_manifest_size,
            source=f"from {up.host.host}",
        )

    def keep_manifest(self, target: Target, digest: Digest, body: bytes, media_type: str) -> None:
        """`commit_manifest`, unless this repository's copy is stored or on its way."""
        ns, repo = target.namespace.name, target.repository
        if self._on_its_way(_memory_key(target, digest)) is None and (
            self.store.size(digest) is None
            or self.store.linked(ns, repo, digest, "_manifests") is None
        ):
            self.commit_manifest(target, digest, body, media_type)

    def commit_manifest(self, target: Target, digest: Digest, body: bytes, media_type: str) -> None:
        """Check the bytes now (raises DigestMismatch); store them after the answer.

        A worker thread writes, fsyncs and renames the file, off the event loop and off
        the client's way; until then this process answers the manifest from memory.
        The link follows the file, so the disk never links a manifest it lacks, and a
        delete through proxyd meanwhile wins: neither memory nor link outlive it."""
        if not digest.matches(body):
            raise DigestMismatch(str(digest), str(Digest.of(body, digest.algorithm)))
        key = _memory_key(target, digest)
        storing = _Storing(media_type, body, self.store.removals)
        self._storing[key] = storing
        task = asyncio.create_task(self._store_manifest(key, digest, storing))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    def _on_its_way(self, key: MemoryKey) -> _Storing | None:
        """A manifest being stored for this repository, unless a removal since (a
        delete through proxyd, an eviction) means it must not be served from memory."""
        storing = self._storing.get(key)
        if storing is None or storing.removals != self.store.removals:
            return None
        return storing

    async def _store_manifest(self, key: MemoryKey, digest: Digest, storing: _Storing) -> None:
        try:
            await in_worker(self.store.put, digest, storing.body)
            if self.store.removals == storing.removals:
                ns, repo, _ = key
                self.store.link(ns, repo, digest, "_manifests", storing.media_type)
            if self.fleet is not None:  # peers may take it from here, as a blob
                await self.fleet.stored(digest)
        except Exception as exc:  # the cache's loss, not the client's: fetched again later
            log.warning("manifest.not_stored", digest=str(digest), error=str(exc))
        finally:
            if self._storing.get(key) is storing:
                del self._storing[key]

    # -- blobs --------------------------------------------------------------------------

    async def blob(self, target: Target, digest: Digest, *, head: bool) -> BlobAnswer:
        """A stored blob, a download to stream from (verified already: `Joined`), or
        (HEAD of a missing blob) the upstream's answer. Never serves content this
        repository was not confirmed for."""
        size = self.store.use(digest)
        if size is not None:
            try:
                await self._confirm(target, digest)
            except BlobUnknown:
                # No confirmer vouches for the repository; a pull-only mirror may still
                # hold the blob there, as containerd would pull it: a miss, asked of
                # the pull chain, never proxyd's copy.
                if head or not self._mirrors_may_hold(target.namespace):
                    raise
            else:
                self.metrics.cache.labels("blob", "hit").inc()
                return StoredBlob(digest, self.store.path(digest), size)
        download = self._downloads.get(digest)
        if not head and download is not None and download.verified:
            if download.target != target:
                await self._confirm(target, digest)
            self.metrics.cache.labels("blob", "hit").inc()
            self.metrics.coalesced.inc()
            return Joined(download)
        self.metrics.cache.labels("blob", "miss").inc()
        if head:
            return await self._head_blob(target, digest)
        if download is None:
            download = self._start_download(target, digest)
        else:
            self.metrics.coalesced.inc()
            if download.target != target:
                await self._confirm(target, digest)
        await download.answered()
        return download

    @staticmethod
    def _mirrors_may_hold(namespace: Namespace) -> bool:
        """Whether a host that serves pulls does not confirm (a pull-only mirror)."""
        confirmers = namespace.confirmers()
        return any(h not in confirmers for h in namespace.hosts_for(Capability.PULL))

    def held_or_downloading(self, digest: Digest) -> StoredBlob | Download | None:
        """This node's copy of `digest` for a peer of the fleet: stored, or a download
        in flight (streamed as it arrives, its last byte held until verified); None
        when there is neither. Never asks upstream and confirms no repository: a peer
        asks by digest and confirms its repository with its own upstream."""
        size = self.store.use(digest)
        if size is not None:
            return StoredBlob(digest, self.store.path(digest), size)
        return self._downloads.get(digest)

    async def _confirm(self, target: Target, digest: Digest) -> None:
        """A confirmer must have said this repository holds the digest before we serve
        it: asked with a `HEAD` of the repository's blob, unless linked already."""
        if self.store.linked(target.namespace.name, target.repository, digest) is None:
            await self._head_blob(target, digest)

    async def _head_blob(self, target: Target, digest: Digest) -> BlobHead:
        """A `HEAD` of the repository's blob, asked of the confirmers alone: whether a
        repository holds a digest is theirs to say (a mirror's 200 would unlock what
        proxyd holds, or make a client skip the upload of a blob the upstream lacks)."""
        namespace = target.namespace
        async with self.upstream.ask(
            target, Capability.RESOLVE, "HEAD", f"blobs/{digest}", hosts=namespace.confirmers()
        ) as up:
            await expect(up, f"blob {digest}", not_found=BlobUnknown)
            length = up.response.content_length
        self.store.link(namespace.name, target.repository, digest)
        return BlobHead(digest, length, up.host.host)

    def _link_served(self, target: Target, digest: Digest) -> None:
        """Link a verified download's repository, its host having vouched for it; a
        failure (a full disk) costs the link, never the download."""
        try:
            self.store.link(target.namespace.name, target.repository, digest)
        except OSError as exc:
            log.warning("blob.not_linked", digest=str(digest), error=str(exc))

    async def _confirm_served(
        self, target: Target, digest: Digest, served_by: RegistryHost
    ) -> None:
        """A verified download from a host that does not vouch for the repository (a
        pull-only mirror): linked once a confirmer says so, off the clients' way (they
        have their bytes). A failure costs the link, never the download."""
        try:
            await self._confirm(target, digest)
        except (ProxydError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.info(
                "blob.unconfirmed",
                digest=str(digest),
                repository=target.repository,
                served_by=served_by.host,
                error=exc.message if isinstance(exc, ProxydError) else str(exc),
            )

    def _start_download(self, target: Target, digest: Digest) -> Download:
        download = Download(digest, target)
        self._downloads[digest] = download
        task = asyncio.create_task(self._download(target, download))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return download

    async def _download(self, target: Target, download: Download) -> None:
        """Fetch until the digest is verified (readers then have every byte), then
        store; the download is registered until the blob is in the store or dropped."""
        digest = download.digest
        try:
            try:
                served_by = await self._fill(target, download)
            except BaseException as exc:
                download.error = exc  # its readers stop at their next read
                self._forget(download)  # a request from now on starts afresh
                if isinstance(exc, DigestMismatch):
                    self.metrics.digest_mismatches.labels(download.host).inc()
                if isinstance(
                    exc, DigestMismatch | aiohttp.ClientError | TimeoutError | UpstreamError
                ):
                    log.warning("blob.failed", digest=str(digest), error=str(exc))
                try:
                    await download.discard()  # the temporary file goes before anyone hears
                finally:
                    download.answer()  # if upstream had not answered yet
                if self.fleet is not None:
                    await self.fleet.dropped(digest)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if target.namespace.vouches(served_by):  # linked before a reader resumes
                self._link_served(target, digest)
                await self._store(download)
            else:
                await asyncio.gather(
                    self._store(download), self._confirm_served(target, digest, served_by)
                )
            if self.fleet is not None:
                await (self.fleet.stored if download.stored else self.fleet.dropped)(digest)
        finally:
            if download.host and download.peer is None:
                self.metrics.bytes_fetched.labels(download.host).inc(download.received)
            self._forget(download)
            download.notify()
            download.release()

    def _forget(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    async def _fill(self, target: Target, download: Download) -> RegistryHost:
        """The download's bytes from the upstream chain, or in a fleet from the source
        the directory names (a peer, its bytes in the repository once confirmed)."""
        if self.fleet is None:
            return await self._fetch(target, download)
        return await self.fleet.fetch(target, download, chain=self._fetch, confirm=self._confirm)

    async def _fetch(self, target: Target, download: Download) -> RegistryHost:
        """Stream the blob into `download` until its digest is verified; the host that
        served it."""
        digest = download.digest
        # The temporary file is made while upstream is asked, at the loop's next turn
        # (the request is on its way by then), instead of on the way to the first byte.
        early = asyncio.get_running_loop().call_soon(download.open_early, self.store)
        try:
            async with self.upstream.ask(target, Capability.PULL, "GET", f"blobs/{digest}") as up:
                await expect(up, f"blob {digest}", not_found=BlobUnknown)
                download.size = up.response.content_length
                download.host = up.host.host
                download.open(self.store)  # made already, unless that failed
                download.answer()
                raw = up.raw_body() if self._splices < splicing.MAX_SPLICES else None
                if raw is not None:
                    self._splices += 1
                    try:
                        await download.splice(raw)
                    finally:
                        self._splices -= 1
                else:
                    async for chunk in up.chunks():
                        await download.write(chunk)
                await download.verify()  # in the block: a mismatch is this host's failure
        finally:
            early.cancel()  # the request failed before the loop turned: nothing to make
        return up.host

    async def _store(self, download: Download) -> None:
        """The clients have their verified bytes; now the fsync and the rename, in a
        worker thread. A failure here costs the cache, not the clients: it is logged,
        nothing is kept, and the next request fetches again."""
        writer = download.writer
        assert writer is not None, "a verified download has its writer"
        digest = download.digest
        failure: BaseException | None = None
        stored_before = self.store.size(digest) is not None  # fetched again for a mirror
        try:
            await in_worker(writer.persist)
        except BaseException as exc:
            failure = exc
        writer.close()  # after a rename this leaves the file in place
        if writer.committed:
            download.stored = self.store.path(digest)
            if not stored_before:
                self.on_commit(writer.written)
            log.info("blob.stored", digest=str(digest), size=writer.written, host=download.host)
        elif not isinstance(failure, asyncio.CancelledError):
            log.warning("blob.not_stored", digest=str(digest), error=str(failure))
        if isinstance(failure, asyncio.CancelledError):
            raise failure


def _memory_key(target: Target, digest: Digest) -> MemoryKey:
    return (target.namespace.name, target.repository, str(digest))
