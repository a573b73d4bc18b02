"""The pull core: answer manifest and blob requests from the store when upstream has
confirmed the repository holds the content, and otherwise fetch, verify and store.

A blob download is a background task shared by every request for its digest: it
writes a temporary file while hashing it, and each client streams from that file as
bytes arrive. The last byte is held back until the digest is verified, so a client
never receives a complete wrong body; a mismatch cuts every client short and keeps
nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog

from proxyd.convert import convert_legacy_config
from proxyd.errors import (
    BlobUnknown,
    Denied,
    DigestInvalid,
    DigestMismatch,
    ManifestTooLarge,
    ManifestUnknown,
    NameUnknown,
    Offline,
    ProxydError,
    RangeNotSatisfiable,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
)
from proxyd.flight import SingleFlight
from proxyd.hosts import Capability, Namespace
from proxyd.hot import HotManifest, HotManifests, HotTags
from proxyd.hot import Key as HotKey
from proxyd.metrics import Metrics
from proxyd.reference import Digest, is_digest
from proxyd.routing import Target
from proxyd.smallcache import Entry, SmallCache
from proxyd.store import BlobStore, BlobWriter
from proxyd.upstream import Upstream, UpstreamClient, registry_errors
from proxyd.writebehind import WriteBehind, in_worker

log = structlog.get_logger("proxyd.fetch")
T = TypeVar("T")

READ_CHUNK = 1 << 20
MAX_HOT_TAGS = 4096  # fresh tag answers remembered (their manifests count in manifest_memory)
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)


@dataclass
class Manifest:
    digest: Digest
    media_type: str
    size: int
    body: bytes
    cache: str  # "hit", "miss", "revalidated" (upstream said unchanged) or "stale"
    host: str | None = None
    fresh_until: float | None = None  # a hit from memory: servable as is until then


@dataclass
class TagList:
    body: dict[str, Any]
    link: str | None  # the upstream's pagination Link
    cache: str
    host: str | None = None


@dataclass
class StoredBlob:
    digest: Digest
    path: os.PathLike[str]
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


@dataclass(frozen=True)
class _Storing:
    media_type: str
    body: bytes
    removals: int  # the store's removal count when it was fetched


class Download:
    """One upstream fetch of a blob, streamed to any number of readers.

    Chunks from upstream go through a write-behind (hashed and written in a worker
    thread). Readers pread the temporary file, and take what has not reached it yet
    from the chunks still queued for it; the blob's last byte only once the digest is
    verified. The fsync and rename into the store follow the release of the last
    byte; until they are done the download stays registered, and a request arriving
    meanwhile joins it.
    """

    def __init__(self, digest: Digest, target: Target) -> None:
        self.digest = digest
        self.target = target  # the repository whose GET confirms the digest
        self.size: int | None = None
        self.host = ""
        self.received = 0  # bytes read from upstream
        self.verified = False  # the digest matched: readers may have every byte
        self.stored: Path | None = None  # where the blob was renamed to
        self.error: BaseException | None = None
        self.writer: BlobWriter | None = None
        self._pipe: WriteBehind | None = None
        self._unwritten: deque[tuple[int, bytes]] = deque()  # (offset, chunk) not on disk yet
        self._waiters: list[asyncio.Future[None]] = []
        self._fd = -1  # the temporary file, for readers
        self._users = 1  # the download itself; each reader adds one
        self._answered = False  # upstream answered the GET, or the download failed first

    def answer(self) -> None:
        """Upstream answered the GET, or (`error` set) the download failed first: the
        requests waiting for that resume at the loop's next turn, before the first
        chunk's disk write (which `WriteBehind` leaves to that turn)."""
        self._answered = True
        self.notify()

    async def answered(self) -> None:
        """Until upstream answered; raises the download's failure, if it failed. A
        request cancelled meanwhile ends its own wait, not the download."""
        while not self._answered:
            await self._news()
        if self.error is not None:
            raise self.error

    @property
    def written(self) -> int:
        """Bytes on disk: what readers may pread (but the last byte, until verified)."""
        return self._pipe.written if self._pipe is not None else 0

    def open(self, store: BlobStore) -> None:
        """Create the temporary file, and the descriptor readers pread (once)."""
        if self.writer is not None:
            return
        writer = store.writer(self.digest)
        try:
            self._fd = os.open(writer.temp_path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            writer.close()
            raise
        self.writer = writer

    def open_early(self, store: BlobStore) -> None:
        """`open` while upstream has yet to answer; if it fails, `open` meets (and
        raises) the same failure once upstream answered."""
        with contextlib.suppress(OSError):
            self.open(store)

    async def write(self, chunk: bytes) -> None:
        """Queue a chunk for the disk; wait while too much is queued already."""
        if self._pipe is None:
            assert self.writer is not None, "the download writes once it is open"
            self._pipe = WriteBehind(self.writer, self._advance)
        self._unwritten.append((self.received, chunk))
        self.received += len(chunk)
        self._pipe.feed(chunk)
        self.notify()  # readers caught up take it from memory
        if self._pipe.backlog > self._pipe.high_water:
            await self._pipe.room()

    async def verify(self) -> None:
        """Once every byte is on disk: check the digest, then release the last byte."""
        if self._pipe is not None:
            await self._pipe.flush()
        assert self.writer is not None, "the download verifies once it is open"
        if self.size is not None and self.written != self.size:
            raise UpstreamError(f"{self.host} sent {self.written} of {self.size} bytes")
        self.writer.verify()  # raises DigestMismatch, keeping nothing
        self.verified = True
        self.notify()

    async def discard(self) -> None:
        """After a failure: let the worker thread finish with the file, then drop it."""
        try:
            if self._pipe is not None:
                await self._pipe.stop()
        finally:
            if self.writer is not None:
                self.writer.close()

    def _advance(self, written: int) -> None:
        """The write-behind put `written` bytes on disk: readers may pread them now."""
        unwritten = self._unwritten
        while unwritten and unwritten[0][0] + len(unwritten[0][1]) <= written:
            unwritten.popleft()
        self.notify()

    def _unwritten_bytes(self, offset: int, limit: int) -> bytes:
        """Bytes from `offset` (at or past what is on disk), up to `limit`, from the
        chunk queued for the disk that holds them."""
        for start, chunk in self._unwritten:
            if start <= offset < start + len(chunk):
                if offset == start and start + len(chunk) <= limit:
                    return chunk
                return chunk[offset - start : limit - start]
        raise UpstreamError(f"bytes at {offset} of {self.digest} are neither on disk nor held")

    def _releasable(self) -> int:
        """How many bytes readers may have now: all once verified; before that all but
        the blob's last byte. With the size known, only the final byte itself waits;
        without it any byte may be the last, so the newest one waits (and every chunk
        then goes out in two pieces)."""
        if self.verified:
            return self.received
        if self.size is not None and self.received < self.size:
            return self.received
        return self.received - 1

    async def _news(self) -> None:
        """Until the next `notify` (a waiter of its own: cancelling it ends only this
        wait)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def chunks(self, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, stop) of the blob as they arrive; raises if the download
        fails. Until the digest is verified, the blob's last byte is withheld."""
        self._users += 1
        offset = start
        try:
            if self._fd < 0 and self.error is None:
                # The download ended between handing this reader out and its first read.
                if self.stored is None:
                    raise UpstreamError(f"the download of {self.digest} was not kept")
                self._fd = os.open(self.stored, os.O_RDONLY | os.O_CLOEXEC)
            while stop is None or offset < stop:
                if self.error is not None:
                    raise UpstreamError(f"download of {self.digest} failed: {self.error}")
                available = self._releasable()
                if stop is not None:
                    available = min(available, stop)
                if offset < available:
                    if offset < self.written:
                        on_disk = min(available, self.written)
                        data = os.pread(self._fd, min(READ_CHUNK, on_disk - offset), offset)
                        if not data:  # the file is shorter than written: never spin on it
                            raise UpstreamError(f"temporary file of {self.digest} was truncated")
                    else:
                        data = self._unwritten_bytes(offset, available)
                    offset += len(data)
                    yield data
                elif self.verified:
                    return
                else:
                    await self._news()
        finally:
            self.release()


class Puller:
    def __init__(
        self,
        store: BlobStore,
        upstream: UpstreamClient,
        small: SmallCache,
        *,
        max_manifest_size: int,
        offline: bool = False,
        on_commit: Callable[[int], None] = lambda size: None,
        metrics: Metrics | None = None,
        hot_manifest_bytes: int = 32 << 20,
        tags_can_move: Callable[[Namespace], bool] = lambda namespace: True,
    ) -> None:
        self.store = store
        self.hot = HotManifests(store, hot_manifest_bytes)
        self.hot_tags: HotTags[Digest] = HotTags(
            max_entries=MAX_HOT_TAGS if hot_manifest_bytes > 0 else 0
        )
        # Whether a push or delete through proxyd may move a namespace's tags: only
        # then is a cached tag checked against the tag-changed mark (one more read).
        self.tags_can_move = tags_can_move
        self.upstream = upstream
        self.small = small
        self.max_manifest_size = max_manifest_size
        self.offline = offline
        self.on_commit = on_commit  # a blob of this size was stored (eviction watches)
        self.metrics = metrics or Metrics()
        self.flights: SingleFlight[Any] = SingleFlight(on_join=self.metrics.coalesced.inc)
        self._downloads: dict[Digest, Download] = {}
        self._storing: dict[HotKey, _Storing] = {}  # manifests on their way to the disk
        self._stores: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        # Manifests on their way to the disk are small: they are let finish.
        await asyncio.gather(*self._stores, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- manifests ----------------------------------------------------------------------

    async def manifest(self, target: Target, reference: str, accept: list[str]) -> Manifest:
        if not is_digest(reference):
            return await self._resolve_tag(target, reference, accept)
        digest = Digest.parse(reference)
        ns, repo = target.namespace.name, target.repository
        hot_key = (ns, repo, str(digest))
        hot = self.hot.get(hot_key) or self._stored_manifest(hot_key, digest)
        if hot is not None:
            self.metrics.cache.labels("manifest", "hit").inc()
            body = hot.body
            return Manifest(digest, hot.media_type, len(body), body, "hit", None, hot.fresh_until)
        self.metrics.cache.labels("manifest", "miss").inc()
        key = ("manifest", ns, repo, digest)
        manifest: Manifest = await self.flights.run(
            key, lambda: self._fetch_manifest(target, digest, accept)
        )
        return manifest

    def _stored_manifest(self, key: HotKey, digest: Digest) -> HotManifest | None:
        """The manifest from the store, or on its way there; remembered when found."""
        storing = self._on_its_way(key)
        if storing is not None:
            return self.hot.put(key, storing.media_type, storing.body)
        ns, repo, _ = key
        media_type = self.store.linked(ns, repo, digest, "_manifests")
        body = self.store.read(digest) if media_type is not None else None
        if media_type is None or body is None:
            return None
        self.store.use(digest)
        return self.hot.put(key, media_type, body)

    async def _fetch_manifest(self, target: Target, digest: Digest, accept: list[str]) -> Manifest:
        async with self._request(
            target, Capability.PULL, "GET", f"manifests/{digest}", accept
        ) as up:
            await _raise_for_status(up, ManifestUnknown, f"manifest {digest}")
            body = await self._read_manifest(up)
            media_type = _media_type(up.response, body)
        try:
            self._commit_manifest(target, digest, body, media_type)
        except DigestMismatch:
            self.metrics.digest_mismatches.labels(up.host.host).inc()
            raise
        return Manifest(digest, media_type, len(body), body, "miss", up.host.host)

    async def tag_changed(self, target: Target, tag: str) -> None:
        """A push or delete through proxyd moved the tag: answers cached before now
        (for any Accept set, on any replica sharing the cache) are out of date."""
        await self.small.put(_tag_changed_key(target, tag), {})

    async def _resolve_tag(self, target: Target, tag: str, accept: list[str]) -> Manifest:
        key = _tag_key(target, tag, accept)
        # Where no push or delete through proxyd can move a tag, only its TTL ends an
        # answer, so this process may remember it; elsewhere every answer is checked
        # against the tag-changed mark another replica may have left.
        remember = not self.tags_can_move(target.namespace)
        if remember and (remembered := self._remembered_tag(target, key)) is not None:
            return remembered
        ttl = target.namespace.tag_ttl

        async def refresh(entry: Entry | None) -> Manifest:
            manifest = await self._refresh_tag(target, tag, accept, key, entry)
            if remember:
                self._remember_tag(target, key, manifest, ttl)
            return manifest

        def from_entry(entry: Entry, cache: str) -> Manifest:
            manifest = self._from_entry(target, entry, cache)
            if remember and cache == "hit":
                self._remember_tag(target, key, manifest, ttl - entry.age(self.small.now()))
            return manifest

        return await self._through_cache(
            target,
            key,
            "tag",
            f"tag {tag}",
            changed_key=None if remember else _tag_changed_key(target, tag),
            refresh=refresh,
            from_entry=from_entry,
        )

    def _remembered_tag(self, target: Target, key: str) -> Manifest | None:
        remembered = self.hot_tags.get(key)
        if remembered is None:
            return None
        digest, until = remembered
        hot = self.hot.get((target.namespace.name, target.repository, str(digest)))
        if hot is None:
            return None
        self.metrics.cache.labels("tag", "hit").inc()
        body = hot.body
        fresh_until = min(until, hot.fresh_until)  # the tag and its manifest both stand
        return Manifest(digest, hot.media_type, len(body), body, "hit", None, fresh_until)

    def _remember_tag(self, target: Target, key: str, manifest: Manifest, fresh_for: float) -> None:
        """A fresh answer (its bytes verified, the repository's link made or on its way)."""
        hot_key = (target.namespace.name, target.repository, str(manifest.digest))
        self.hot.put(hot_key, manifest.media_type, manifest.body)
        self.hot_tags.put(key, manifest.digest, fresh_for)

    async def _through_cache(
        self,
        target: Target,
        key: str,
        kind: str,
        what: str,
        refresh: Callable[[Entry | None], Awaitable[T]],
        from_entry: Callable[[Entry, str], T],
        changed_key: str | None = None,
    ) -> T:
        """The small-response policy: a fresh entry is served; an old one is
        revalidated or refetched (once, however many ask); when every host fails, an
        old entry is served marked stale. --offline serves entries of any age."""
        entry = await self.small.get(key)
        if entry is not None:
            fresh = entry.age(self.small.now()) < target.namespace.tag_ttl
            if fresh and changed_key is not None:
                changed = await self.small.get(changed_key)
                fresh = changed is None or changed.stored_at < entry.stored_at
            if fresh or self.offline:
                self.metrics.cache.labels(kind, "hit" if fresh else "stale").inc()
                return from_entry(entry, "hit" if fresh else "stale")
        if self.offline:
            raise Offline(f"offline, and {what} of {target.repository} is not cached")
        try:
            result: T = await self.flights.run(key, lambda: refresh(entry))
            self.metrics.cache.labels(kind, "revalidated" if entry else "miss").inc()
            return result
        except (UpstreamError, TooManyRequests) as exc:
            if entry is None:
                raise
            self.metrics.cache.labels(kind, "stale").inc()
            log.warning(
                "cache.stale",
                namespace=target.namespace.name,
                repository=target.repository,
                what=what,
                age_s=round(entry.age(self.small.now())),
                error=exc.message,
            )
            return from_entry(entry, "stale")

    async def _refresh_tag(
        self, target: Target, tag: str, accept: list[str], key: str, entry: Entry | None
    ) -> Manifest:
        if entry is not None:
            async with self._request(
                target, Capability.RESOLVE, "HEAD", f"manifests/{tag}", accept
            ) as up:
                await _raise_for_status(up, ManifestUnknown, f"manifest {tag}")
                announced = up.response.headers.get("Docker-Content-Digest")
            if announced == entry.value.get("upstream_digest", entry.value.get("digest")):
                await self.small.put(key, entry.value)  # unchanged: no body transferred
                return self._from_entry(target, entry, "revalidated", up.host.host)
        async with self._request(
            target, Capability.RESOLVE, "GET", f"manifests/{tag}", accept
        ) as up:
            await _raise_for_status(up, ManifestUnknown, f"manifest {tag}")
            announced = up.response.headers.get("Docker-Content-Digest")
            body = await self._read_manifest(up)
            media_type = _media_type(up.response, body)
        algorithm = _announced(announced, up).algorithm if announced else "sha256"
        digest = Digest(algorithm, hashlib.new(algorithm, body).hexdigest())
        if announced and str(digest) != announced:
            self.metrics.digest_mismatches.labels(up.host.host).inc()
            raise DigestMismatch(announced, str(digest), host=up.host.host)
        self._commit_manifest(target, digest, body, media_type)
        upstream_digest = digest
        converted = (
            convert_legacy_config(body, media_type)
            if target.namespace.convert_legacy_config
            else None
        )
        if converted is not None:  # the original stays stored under its own digest
            body = converted
            digest = Digest("sha256", hashlib.sha256(body).hexdigest())
            self._commit_manifest(target, digest, body, media_type)
            log.info("manifest.converted", original=str(upstream_digest), converted=str(digest))
        await self.small.put(
            key,
            {
                "digest": str(digest),
                "upstream_digest": str(upstream_digest),
                "media_type": media_type,
                "body": base64.b64encode(body).decode(),
            },
        )
        return Manifest(digest, media_type, len(body), body, "miss", up.host.host)

    def _from_entry(
        self, target: Target, entry: Entry, cache: str, host: str | None = None
    ) -> Manifest:
        """A cached tag resolution; its bytes are checked against its digest, since the
        record may come from a shared cache, and land in this replica's store."""
        try:
            digest = Digest.parse(str(entry.value["digest"]))
            body = base64.b64decode(str(entry.value["body"]), validate=True)
            media_type = str(entry.value["media_type"])
        except (KeyError, ValueError, ProxydError):
            raise UpstreamError("a cached tag record is damaged") from None
        if hashlib.new(digest.algorithm, body).hexdigest() != digest.hex:
            raise DigestMismatch(str(digest), "a cached tag record with other bytes")
        ns, repo = target.namespace.name, target.repository
        if self._on_its_way((ns, repo, str(digest))) is None and (
            self.store.size(digest) is None
            or self.store.linked(ns, repo, digest, "_manifests") is None
        ):
            self._commit_manifest(target, digest, body, media_type)
        return Manifest(digest, media_type, len(body), body, cache, host)

    def _commit_manifest(
        self, target: Target, digest: Digest, body: bytes, media_type: str
    ) -> None:
        """Check the bytes now (raises DigestMismatch); store them after the answer.

        A worker thread writes, fsyncs and renames the file, off the event loop and off
        the client's way; until then this process answers the manifest from memory.
        The link follows the file, so the disk never links a manifest it lacks, and a
        delete through proxyd meanwhile wins: neither memory nor link outlive it."""
        actual = hashlib.new(digest.algorithm, body).hexdigest()
        if actual != digest.hex:
            raise DigestMismatch(str(digest), f"{digest.algorithm}:{actual}")
        key = (target.namespace.name, target.repository, str(digest))
        storing = _Storing(media_type, body, self.store.removals)
        self._storing[key] = storing
        task = asyncio.create_task(self._store_manifest(key, digest, storing))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    def _on_its_way(self, key: HotKey) -> _Storing | None:
        """A manifest being stored for this repository, unless a removal since (a
        delete through proxyd, an eviction) means it must not be served from memory."""
        storing = self._storing.get(key)
        if storing is None or storing.removals != self.store.removals:
            return None
        return storing

    async def _store_manifest(self, key: HotKey, digest: Digest, storing: _Storing) -> None:
        try:
            await in_worker(self.store.put, digest, storing.body)
            if self.store.removals == storing.removals:
                ns, repo, _ = key
                self.store.link(ns, repo, digest, "_manifests", storing.media_type)
        except Exception as exc:  # the cache's loss, not the client's: fetched again later
            log.warning("manifest.not_stored", digest=str(digest), error=str(exc))
        finally:
            if self._storing.get(key) is storing:
                del self._storing[key]

    async def _read_manifest(self, up: Upstream) -> bytes:
        """Read at most max_manifest_size bytes (containerd's MaxManifestSize)."""
        limit = self.max_manifest_size
        length = up.response.content_length
        if length is not None and length > limit:
            raise ManifestTooLarge(f"manifest from {up.host.host} is {length} bytes; limit {limit}")
        body = await _read_body(up, limit + 1)
        if len(body) > limit:
            raise ManifestTooLarge(
                f"manifest from {up.host.host} exceeds the limit of {limit} bytes"
            )
        return body

    # -- blobs --------------------------------------------------------------------------

    async def blob(
        self, target: Target, digest: Digest, *, head: bool
    ) -> StoredBlob | Download | Joined | BlobHead:
        """A stored blob, a download to stream from (verified already: `Joined`), or
        (HEAD of a missing blob) the upstream's answer. Never serves content this
        repository was not confirmed for."""
        size = self.store.use(digest)
        if size is not None:
            await self._confirm(target, digest)
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

    async def _confirm(self, target: Target, digest: Digest) -> None:
        """Upstream must have said this repository holds the digest before we serve it."""
        if self.store.linked(target.namespace.name, target.repository, digest) is None:
            await self._head_blob(target, digest)

    async def _head_blob(self, target: Target, digest: Digest) -> BlobHead:
        async with self._request(target, Capability.PULL, "HEAD", f"blobs/{digest}") as up:
            await _raise_for_status(up, BlobUnknown, f"blob {digest}")
            length = up.response.content_length
        self.store.link(target.namespace.name, target.repository, digest)
        return BlobHead(digest, length, up.host.host)

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
                await self._fetch(target, download)
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
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            await self._store(download)
        finally:
            if download.host:
                self.metrics.bytes_fetched.labels(download.host).inc(download.received)
            self._forget(download)
            download.notify()
            download.release()

    def _forget(self, download: Download) -> None:
        if self._downloads.get(download.digest) is download:
            del self._downloads[download.digest]

    async def _fetch(self, target: Target, download: Download) -> None:
        digest = download.digest
        # The temporary file is made while upstream is asked, at the loop's next turn
        # (the request is on its way by then), instead of on the way to the first byte.
        early = asyncio.get_running_loop().call_soon(download.open_early, self.store)
        try:
            async with self._request(target, Capability.PULL, "GET", f"blobs/{digest}") as up:
                await _raise_for_status(up, BlobUnknown, f"blob {digest}")
                download.size = up.response.content_length
                download.host = up.host.host
                download.open(self.store)  # made already, unless that failed
                download.answer()
                async for chunk in up.response.content.iter_any():
                    await download.write(chunk)
        finally:
            early.cancel()  # the request failed before the loop turned: nothing to make
        # Upstream's 200 confirmed the repository holds it (written here, after the body,
        # to keep it off the way to the first byte).
        self.store.link(target.namespace.name, target.repository, digest)
        await download.verify()

    async def _store(self, download: Download) -> None:
        """The clients have their verified bytes; now the fsync and the rename, in a
        worker thread. A failure here costs the cache, not the clients: it is logged,
        nothing is kept, and the next request fetches again."""
        writer = download.writer
        assert writer is not None, "a verified download has its writer"
        digest = download.digest
        failure: BaseException | None = None
        try:
            await in_worker(writer.persist)
        except BaseException as exc:
            failure = exc
        writer.close()  # after a rename this leaves the file in place
        if writer.committed:
            download.stored = self.store.path(digest)
            self.on_commit(writer.written)
            log.info("blob.stored", digest=str(digest), size=writer.written, host=download.host)
        elif not isinstance(failure, asyncio.CancelledError):
            log.warning("blob.not_stored", digest=str(digest), error=str(failure))
        if isinstance(failure, asyncio.CancelledError):
            raise failure

    # -- the rest ------------------------------------------------------------------------

    async def tags(self, target: Target, params: dict[str, str]) -> TagList:
        key = f"tags {target.namespace.name} {target.repository} {sorted(params.items())}"
        return await self._through_cache(
            target,
            key,
            "tags",
            "the tag list",
            refresh=lambda _: self._fetch_tags(target, params, key),
            from_entry=lambda entry, cache: TagList(
                entry.value["body"], entry.value.get("link"), cache
            ),
        )

    async def _fetch_tags(self, target: Target, params: dict[str, str], key: str) -> TagList:
        async with self._request(
            target, Capability.RESOLVE, "GET", "tags/list", params=params
        ) as up:
            await _raise_for_status(up, NameUnknown, f"repository {target.repository}")
            body = await self._read_json(up)
            link = up.response.headers.get("Link")
        await self.small.put(key, {"body": body, "link": link})
        return TagList(body, link, "miss", up.host.host)

    async def referrers(self, target: Target, digest: Digest, artifact_type: str | None) -> TagList:
        """OCI 1.1 referrers, cached like tags; a registry without the API (404) is
        asked for the referrers tag schema (`sha256-<hex>`), as the spec describes."""
        key = f"referrers {target.namespace.name} {target.repository} {digest} {artifact_type}"
        return await self._through_cache(
            target,
            key,
            "referrers",
            f"the referrers of {digest}",
            refresh=lambda _: self._fetch_referrers(target, digest, artifact_type, key),
            from_entry=lambda entry, cache: TagList(entry.value["body"], None, cache),
        )

    async def _fetch_referrers(
        self, target: Target, digest: Digest, artifact_type: str | None, key: str
    ) -> TagList:
        params = {"artifactType": artifact_type} if artifact_type else None
        async with self._request(
            target, Capability.RESOLVE, "GET", f"referrers/{digest}", [OCI_INDEX], params
        ) as up:
            host = up.host.host
            if up.response.status != 404:
                await _raise_for_status(up, ManifestUnknown, f"referrers of {digest}")
                body = await self._read_json(up)
                filtered = "artifactType" in up.response.headers.get("OCI-Filters-Applied", "")
        if up.response.status == 404:  # no referrers API: the tag schema
            body, filtered = await self._referrers_tag(target, digest), False
        if artifact_type and not filtered:
            body["manifests"] = [
                m
                for m in body.get("manifests", [])
                if isinstance(m, dict) and m.get("artifactType") == artifact_type
            ]
        await self.small.put(key, {"body": body})
        return TagList(body, None, "miss", host)

    async def _referrers_tag(self, target: Target, digest: Digest) -> dict[str, Any]:
        tag = f"{digest.algorithm}-{digest.hex}"
        async with self._request(
            target, Capability.RESOLVE, "GET", f"manifests/{tag}", [OCI_INDEX]
        ) as up:
            if up.response.status == 404:
                return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
            await _raise_for_status(up, ManifestUnknown, f"referrers tag {tag}")
            return await self._read_json(up)

    async def catalog(self, namespace: Namespace, params: dict[str, str]) -> TagList:
        """`/v2/_catalog`, passed to the upstream where it allows it; not cached."""
        target = Target(namespace, "")
        async with self._request(
            target, Capability.RESOLVE, "GET", "_catalog", params=params
        ) as up:
            await _raise_for_status(up, NameUnknown, "the catalog")
            body = await self._read_json(up)
            return TagList(body, up.response.headers.get("Link"), "miss", up.host.host)

    async def _read_json(self, up: Upstream) -> dict[str, Any]:
        try:
            body = json.loads(await _read_body(up, self.max_manifest_size))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise UpstreamError(f"{up.host.host} sent an answer that is not a JSON object")
        return body

    def _request(
        self,
        target: Target,
        capability: Capability,
        method: str,
        suffix: str,
        accept: list[str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        headers = [("Accept", value) for value in (accept or [])]
        if suffix.startswith("manifests/") and not accept:
            headers = [("Accept", value) for value in MANIFEST_TYPES]
        return self.upstream.request(
            target.namespace,
            capability,
            method,
            target.repository,
            suffix,
            headers=headers,
            params=params,
        )


async def _read_body(up: Upstream, limit: int) -> bytes:
    """Up to `limit` bytes of a small body. A body that breaks or stalls is the host's
    failure: the upstream client turns it into UpstreamError (502, or a stale answer)."""
    content = up.response.content
    body = await content.read(limit)
    while len(body) < limit and not content.at_eof():
        more = await content.read(limit - len(body))
        if not more:
            break
        body += more
    return body


def _tag_changed_key(target: Target, tag: str) -> str:
    return f"tag-changed {target.namespace.name} {target.repository} {tag}"


def _tag_key(target: Target, tag: str, accept: list[str]) -> str:
    """What a tag resolves to depends on what the client accepts (index or manifest)."""
    accepted = ",".join(sorted({a.strip() for v in accept for a in v.split(",")})) or "*"
    return f"tag {target.namespace.name} {target.repository} {tag} {accepted}"


def _announced(header: str, up: Upstream) -> Digest:
    """A registry's Docker-Content-Digest; a malformed one is its fault, not the client's."""
    try:
        return Digest.parse(header)
    except DigestInvalid:
        raise UpstreamError(f"{up.host.host} announced a malformed digest {header!r}") from None


def _media_type(response: aiohttp.ClientResponse, body: bytes) -> str:
    header = response.headers.get("Content-Type", "").split(";")[0].strip()
    if header and header not in ("application/json", "text/plain", "application/octet-stream"):
        return header
    try:
        declared = json.loads(body).get("mediaType")
    except (ValueError, AttributeError):
        declared = None
    return declared if isinstance(declared, str) and declared else header or MANIFEST_TYPES[1]


_NOT_FOUND: dict[str, type[ProxydError]] = {
    "MANIFEST_UNKNOWN": ManifestUnknown,
    "BLOB_UNKNOWN": BlobUnknown,
    "NAME_UNKNOWN": NameUnknown,
}


async def _raise_for_status(up: Upstream, not_found: type[ProxydError], what: str) -> None:
    """Turn an upstream's final non-200 answer into proxyd's error, keeping the
    registry's message: the client sees what the registry said, in OCI form."""
    status = up.response.status
    if status in (200, 206):
        return
    errors, message = await registry_errors(up, what)
    if status == 404:
        code = str(errors[0].get("code")) if errors else ""
        raise _NOT_FOUND.get(code, not_found)(message)
    if status == 401:
        raise Unauthorized(message)
    if status == 403:
        raise Denied(message)
    if status == 416:
        raise RangeNotSatisfiable(message)
    if status == 429:
        retry_after = up.response.headers.get("Retry-After")
        raise TooManyRequests(
            message, headers={"Retry-After": retry_after} if retry_after else None
        )
    raise UpstreamError(f"{message} (status {status})")
