"""Blob uploads through proxyd: starting one (or a cross-repository mount, or a whole
blob in one request), its chunks, its end, its status and its cancelling, each
forwarded to the one host the upload started on, with proxyd's credentials.

Each upload is pinned to that host and tracked by `proxyd.uploads`; bodies stream
upstream as they arrive, hashed and written to a temporary file on the way. When
upstream accepts the blob (201) and the bytes match its digest, the copy is
committed to the store and linked to the repository, so a later pull is served
locally. An upload idle for the tracker's TTL is cancelled upstream.

Like containerd's pusher with its distribution-source labels, proxyd mounts a blob
from another repository of the same upstream instead of sending its bytes again,
when it knows (from its links) a repository holding it, or the client names one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import structlog

from proxyd.background import in_worker, stop_loop
from proxyd.errors import (
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    DigestMismatch,
    ProxydError,
    RangeNotSatisfiable,
    SizeInvalid,
    UpstreamError,
)
from proxyd.exchange import Body
from proxyd.hosts import RegistryHost, Target
from proxyd.push import OCTET_STREAM, Chunks, Pusher
from proxyd.reference import Digest
from proxyd.refusal import expect
from proxyd.uploads import (
    PENDING,
    UploadSession,
    UploadSessions,
    confirmed_offset,
    parse_content_range,
)
from proxyd.upstream import Upstream

log = structlog.get_logger("proxyd.uploader")

ABANDON_TIMEOUT = 10.0  # seconds for the upstream DELETE of an expired upload


@dataclass
class Started:
    """The answer to starting an upload: an upload to continue (202), or a blob
    already in the repository (201: mounted, or sent whole)."""

    session: UploadSession | None
    digest: Digest | None
    host: str


class Uploader:
    def __init__(
        self,
        pusher: Pusher,
        tracker: UploadSessions,
        *,
        on_commit: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.pusher = pusher  # the policy (where pushes go) and the way upstream
        self.store = pusher.store
        self.uploads = tracker
        self.on_commit = on_commit  # a blob of this size was stored (eviction watches)
        self._expiry: asyncio.Task[None] | None = None

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        self._expiry = asyncio.create_task(self._expire_forever())

    async def close(self) -> None:
        await stop_loop(self._expiry)
        await self.uploads.close_all()

    async def _expire_forever(self) -> None:
        every = min(60.0, self.uploads.ttl / 4)
        while True:
            await asyncio.sleep(every)
            await self.expire()

    async def expire(self) -> int:
        """Drop uploads idle longer than the TTL, and cancel them upstream."""
        idle = await self.uploads.expired()
        for session in idle:
            log.info(
                "upload.expired",
                uuid=session.uuid,
                namespace=session.target.namespace.name,
                repository=session.target.repository,
            )
            with contextlib.suppress(ProxydError, aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(ABANDON_TIMEOUT):
                    async with self.pusher.send(
                        session.target, session.host, "DELETE", session.suffix
                    ):
                        pass
        return len(idle)

    # -- starting an upload -------------------------------------------------------------

    async def start_upload(
        self,
        target: Target,
        user: str | None,
        *,
        digest: Digest | None = None,
        body: Chunks | None = None,
        length: int | None = None,
        mount: Digest | None = None,
        mount_from: Target | None = None,
    ) -> Started:
        """`POST …/blobs/uploads/`: a new upload; with `mount`, a cross-repository
        mount first; with `digest`, a whole blob (the body) in one request."""
        host = self.pusher.push_host(target)
        wanted = mount or digest
        source = self._mount_source(target, wanted, mount_from) if wanted else None
        params: dict[str, str] = {}
        scopes: tuple[str, ...] = ()
        if wanted is not None and source is not None:
            params = {"mount": str(wanted), "from": source}
            scopes = (f"repository:{source}:pull",)
        elif mount is not None:
            params = {"mount": str(mount)}  # OCI: the registry may find a source itself
        async with self.pusher.send(
            target, host, "POST", "blobs/uploads/", params=params, scopes=scopes
        ) as up:
            status = up.response.status
            if status == 201 and wanted is not None:
                self.store.link(target.namespace.name, target.repository, wanted)
                log.info(
                    "blob.mounted",
                    digest=str(wanted),
                    repository=target.repository,
                    source=source,
                    host=host.host,
                )
                return Started(None, wanted, host.host)
            await _upload_answered(up, (202,))
            session = await self._open(target, host, up, user, digest)
        if digest is None:
            return Started(session, None, host.host)
        # A whole blob in one POST: upstream gets it as the upload's only PUT, which
        # every registry takes (distribution ignores a POST's body).
        try:
            await self.finish_upload(target, session.uuid, user, digest, body, length)
        finally:
            await self.uploads.close(session)  # the client never saw it: nothing to resume
        return Started(None, digest, host.host)

    async def _open(
        self,
        target: Target,
        host: RegistryHost,
        up: Upstream,
        user: str | None,
        digest: Digest | None,
    ) -> UploadSession:
        location = up.response.headers.get("Location")
        if not location:
            raise UpstreamError(f"{host.host} started an upload without a Location")
        session = await self.uploads.open(target, host, location, user)
        session.offset = confirmed_offset(up.response.headers.get("Range"), 0)
        session.writer = self.store.writer(digest or PENDING)
        await self.uploads.release(session)  # its state saved, wherever sessions live
        return session

    def _mount_source(self, target: Target, digest: Digest, named: Target | None) -> str | None:
        """Where to mount `digest` from: the repository the client named, if it is of
        the same upstream, else one proxyd's links say holds it (its distribution
        source)."""
        if named is not None and named.namespace.name == target.namespace.name:
            return named.repository
        for repository in self.store.repositories_holding(target.namespace.name, digest):
            if repository != target.repository:
                return repository
        return None

    # -- continuing, finishing, asking about and cancelling an upload -------------------

    async def append(
        self,
        target: Target,
        uuid: str,
        user: str | None,
        body: Chunks | None,
        *,
        content_range: str | None = None,
        length: int | None = None,
    ) -> UploadSession:
        """`PATCH`: one more chunk, with `Content-Range` or streamed."""
        self.pusher.push_host(target)
        session = await self.uploads.claim(uuid, target, user)
        try:
            headers = [("Content-Type", OCTET_STREAM)]
            expected: int | None = None
            if content_range is not None:
                first, last = parse_content_range(content_range)
                if session.offset is not None and first != session.offset:
                    raise RangeNotSatisfiable(
                        f"chunk starts at {first}; upload {uuid} holds {session.offset} bytes"
                    )
                if length is not None and length != last - first + 1:
                    raise RangeNotSatisfiable(
                        f"Content-Range {content_range} does not match Content-Length {length}"
                    )
                headers.append(("Content-Range", content_range))
            if length is not None:
                headers.append(("Content-Length", str(length)))
            tee = _Tee(body, session)
            async with self.pusher.send(
                target, session.host, "PATCH", session.suffix, headers=headers, data=tee.data
            ) as up:
                await _upload_answered(up, (202,))
                self._moved(session, up)
                if session.offset is not None:
                    expected = session.offset + tee.sent
                session.offset = confirmed_offset(up.response.headers.get("Range"), expected)
            if session.offset is None or session.offset != expected:
                session.drop_copy()
            return session
        except BaseException as exc:
            await self._failed(session, exc)
            raise
        finally:
            await self.uploads.release(session)

    async def finish_upload(
        self,
        target: Target,
        uuid: str,
        user: str | None,
        digest: Digest,
        body: Chunks | None = None,
        length: int | None = None,
    ) -> str:
        """`PUT ?digest=`: the last chunk (if any), and upstream checks the whole.
        Returns the host that took it."""
        self.pusher.push_host(target)
        session = await self.uploads.claim(uuid, target, user)
        try:
            headers = [("Content-Type", OCTET_STREAM)]
            if length is not None:
                headers.append(("Content-Length", str(length)))
            tee = _Tee(body, session)
            async with self.pusher.send(
                target,
                session.host,
                "PUT",
                session.suffix,
                headers=headers,
                params={"digest": str(digest)},
                data=tee.data,
            ) as up:
                await _upload_answered(up, (201,))
            self.store.link(target.namespace.name, target.repository, digest)
            await self._keep(session, digest, tee.sent)
            log.info(
                "blob.pushed",
                digest=str(digest),
                repository=target.repository,
                host=session.host.host,
                stored=self.store.size(digest) is not None,
                user=session.user,
            )
            return session.host.host
        except BaseException as exc:
            await self._failed(session, exc)
            raise
        finally:
            await self.uploads.release(session)

    async def _keep(self, session: UploadSession, digest: Digest, last_chunk: int) -> None:
        """Commit the local copy when it is the whole blob upstream accepted."""
        writer, session.writer = session.writer, None
        await self.uploads.close(session)
        if writer is None:
            return
        try:
            whole = session.offset is not None and writer.written == session.offset + last_chunk
            if not whole or writer.digest.algorithm != digest.algorithm:
                return
            await in_worker(writer.commit, digest)  # the writer is closed only after it
            self.on_commit(writer.written)
        except DigestMismatch as exc:
            log.warning("blob.push_copy_mismatch", digest=str(digest), actual=exc.actual)
        finally:
            writer.close()

    async def status(self, target: Target, uuid: str, user: str | None) -> UploadSession:
        """`GET`: how much upstream holds (asked, so a resumed upload starts right)."""
        self.pusher.push_host(target)
        session = await self.uploads.claim(uuid, target, user)
        try:
            async with self.pusher.send(target, session.host, "GET", session.suffix) as up:
                await _upload_answered(up, (200, 204))
                self._moved(session, up)
                offset = confirmed_offset(up.response.headers.get("Range"), session.offset)
            if offset != session.offset:
                session.drop_copy()
            session.offset = offset
            return session
        except BlobUploadUnknown:
            await self.uploads.close(session)
            raise
        finally:
            await self.uploads.release(session)

    async def cancel(self, target: Target, uuid: str, user: str | None) -> None:
        """`DELETE`: cancel upstream and forget it (already gone upstream is fine)."""
        self.pusher.push_host(target)
        session = await self.uploads.claim(uuid, target, user)
        try:
            async with self.pusher.send(target, session.host, "DELETE", session.suffix) as up:
                await _upload_answered(up, (200, 202, 204, 404))
            await self.uploads.close(session)
        finally:
            await self.uploads.release(session)

    def _moved(self, session: UploadSession, up: Upstream) -> None:
        location = up.response.headers.get("Location")
        if location:
            session.move(location)

    async def _failed(self, session: UploadSession, exc: BaseException) -> None:
        """After a failed request the local copy may hold bytes upstream does not.
        An upload upstream no longer knows (or refused to finish) is over."""
        session.drop_copy()
        if isinstance(exc, BlobUploadUnknown | DigestInvalid | SizeInvalid):
            await self.uploads.close(session)
        elif not isinstance(exc, RangeNotSatisfiable | BlobUploadInvalid):
            session.offset = None  # ask upstream before trusting it again


class _Tee:
    """The client's body on its way upstream: counted, and copied to the session's
    local copy while there is one."""

    def __init__(self, source: Chunks | None, session: UploadSession) -> None:
        self.source = source
        self.session = session
        self.sent = 0

    @property
    def data(self) -> Body:
        """What the upstream request sends: this stream, or no body at all."""
        return self if self.source is not None else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.source is None:
            return
        async for chunk in self.source:
            if self.session.writer is not None:
                self.session.writer.write(chunk)
            self.sent += len(chunk)
            yield chunk


async def _upload_answered(up: Upstream, ok: tuple[int, ...]) -> None:
    """An upload's refusal: a 404 is an upload upstream no longer knows."""
    await expect(up, "upload", ok=ok, not_found=BlobUploadUnknown, invalid=BlobUploadInvalid)
