"""The push core: blob uploads, cross-repository mounts, manifest PUT and DELETE,
forwarded to the namespace's upstream server with proxyd's own credentials.

Policy: a namespace takes pushes only when allowed (`allow_push`), and only its
upstream server receives them, when it has the push capability; a mirror never
does. DELETE needs `allow_delete`. Each upload is pinned to the host it started on
and tracked by `proxyd.uploads`. Bodies stream to upstream as they arrive, hashed
and written to a temporary file on the way; when upstream accepts the blob (201) and
the bytes match its digest, the copy is committed to the store and linked to the
repository, so a later pull is served locally. Pushed manifests are stored the same
way.

Like containerd's pusher with its distribution-source labels, proxyd mounts a blob
from another repository of the same upstream instead of sending its bytes again,
when it knows (from its links) a repository holding it, or the client names one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Literal

import aiohttp
import structlog

from proxyd.background import stop_loop
from proxyd.config import Registry
from proxyd.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    DigestMismatch,
    ManifestInvalid,
    ManifestUnknown,
    ProxydError,
    RangeNotSatisfiable,
    SizeInvalid,
    Unsupported,
    UpstreamError,
)
from proxyd.exchange import Body
from proxyd.hosts import Capability, RegistryHost
from proxyd.manifests import OCI_MANIFEST, declared_media_type, read_manifest
from proxyd.reference import Digest, is_digest, validate_tag
from proxyd.refusal import expect
from proxyd.routing import Target
from proxyd.store import BlobStore, LinkKind
from proxyd.uploads import (
    PENDING,
    UploadSession,
    UploadTracker,
    confirmed_offset,
    parse_content_range,
)
from proxyd.upstream import Upstream, UpstreamClient
from proxyd.writebehind import in_worker

log = structlog.get_logger("proxyd.push")

OCTET_STREAM = "application/octet-stream"
ABANDON_TIMEOUT = 10.0  # seconds for the upstream DELETE of an expired upload

Chunks = AsyncIterable[bytes]


@dataclass
class Started:
    """The answer to starting an upload: an upload to continue (202), or a blob
    already in the repository (201: mounted, or sent whole)."""

    session: UploadSession | None
    digest: Digest | None
    host: str


@dataclass
class PushedManifest:
    digest: Digest
    host: str
    subject: str | None  # upstream's OCI-Subject (a manifest with a subject)


class Pusher:
    def __init__(
        self,
        registry: Registry,
        store: BlobStore,
        upstream: UpstreamClient,
        *,
        max_manifest_size: int,
        upload_ttl: float,
        on_commit: Callable[[int], None] = lambda size: None,
        on_tag_changed: Callable[[Target, str], Awaitable[None]] | None = None,
        tracker: UploadTracker | None = None,
    ) -> None:
        self.registry = registry
        self.store = store
        self.upstream = upstream
        self.max_manifest_size = max_manifest_size
        self.on_commit = on_commit  # a blob of this size was stored (eviction watches)
        self.on_tag_changed = on_tag_changed  # cached resolutions of the tag are now wrong
        self.uploads = tracker or UploadTracker(upload_ttl)
        self._expiry: asyncio.Task[None] | None = None

    # -- lifetime -----------------------------------------------------------------------

    def start(self) -> None:
        self._expiry = asyncio.create_task(self._expire_forever())

    async def close(self) -> None:
        await stop_loop(self._expiry)
        self.uploads.close_all()

    async def _expire_forever(self) -> None:
        every = min(60.0, self.uploads.ttl / 4)
        while True:
            await asyncio.sleep(every)
            await self.expire()

    async def expire(self) -> int:
        """Drop uploads idle longer than the TTL, and cancel them upstream."""
        idle = self.uploads.expired()
        for session in idle:
            log.info(
                "upload.expired",
                uuid=session.uuid,
                namespace=session.target.namespace.name,
                repository=session.target.repository,
            )
            with contextlib.suppress(ProxydError, aiohttp.ClientError, TimeoutError):
                async with asyncio.timeout(ABANDON_TIMEOUT):
                    async with self._send(session.target, session.host, "DELETE", session.suffix):
                        pass
        return len(idle)

    # -- policy -------------------------------------------------------------------------

    def push_host(self, target: Target) -> RegistryHost:
        """The host pushes to `target` go to; Unsupported when there is none."""
        namespace = target.namespace
        if not self.registry.push_allowed(namespace):
            raise Unsupported(
                f"pushes to {namespace.name} are not allowed; set allow_push "
                f'(allow_push = true in [namespaces."{namespace.name}"], '
                f"--allow-push {namespace.name} or PROXYD_ALLOW_PUSH)"
            )
        return self._writable(target)

    def delete_host(self, target: Target) -> RegistryHost:
        namespace = target.namespace
        if not namespace.allow_delete:
            raise Unsupported(
                f"deletes in {namespace.name} are not allowed; set allow_delete = true "
                f'in [namespaces."{namespace.name}"]'
            )
        return self._writable(target)

    @staticmethod
    def _writable(target: Target) -> RegistryHost:
        host = target.namespace.push_host
        if host is None:
            raise Unsupported(
                f"namespace {target.namespace.name!r} has no host with the push capability "
                "(mirrors never receive pushes)"
            )
        return host

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
        host = self.push_host(target)
        wanted = mount or digest
        source = self._mount_source(target, wanted, mount_from) if wanted else None
        params: dict[str, str] = {}
        scopes: tuple[str, ...] = ()
        if wanted is not None and source is not None:
            params = {"mount": str(wanted), "from": source}
            scopes = (f"repository:{source}:pull",)
        elif mount is not None:
            params = {"mount": str(mount)}  # OCI: the registry may find a source itself
        async with self._send(
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
            session = self._open(target, host, up, user, digest)
        if digest is None:
            return Started(session, None, host.host)
        # A whole blob in one POST: upstream gets it as the upload's only PUT, which
        # every registry takes (distribution ignores a POST's body).
        try:
            await self.finish_upload(target, session.uuid, user, digest, body, length)
        finally:
            self.uploads.close(session)  # the client never saw it: nothing to resume
        return Started(None, digest, host.host)

    def _open(
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
        session = self.uploads.open(target, host, location, user)
        session.offset = confirmed_offset(up.response.headers.get("Range"), 0)
        session.writer = self.store.writer(digest or PENDING)
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
        self.push_host(target)
        session = self.uploads.claim(uuid, target, user)
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
            async with self._send(
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
            self._failed(session, exc)
            raise
        finally:
            self.uploads.release(session)

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
        self.push_host(target)
        session = self.uploads.claim(uuid, target, user)
        try:
            headers = [("Content-Type", OCTET_STREAM)]
            if length is not None:
                headers.append(("Content-Length", str(length)))
            tee = _Tee(body, session)
            async with self._send(
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
            self._failed(session, exc)
            raise
        finally:
            self.uploads.release(session)

    async def _keep(self, session: UploadSession, digest: Digest, last_chunk: int) -> None:
        """Commit the local copy when it is the whole blob upstream accepted."""
        writer, session.writer = session.writer, None
        self.uploads.close(session)
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
        self.push_host(target)
        session = self.uploads.claim(uuid, target, user)
        try:
            async with self._send(target, session.host, "GET", session.suffix) as up:
                await _upload_answered(up, (200, 204))
                self._moved(session, up)
                offset = confirmed_offset(up.response.headers.get("Range"), session.offset)
            if offset != session.offset:
                session.drop_copy()
            session.offset = offset
            return session
        except BlobUploadUnknown:
            self.uploads.close(session)
            raise
        finally:
            self.uploads.release(session)

    async def cancel(self, target: Target, uuid: str, user: str | None) -> None:
        """`DELETE`: cancel upstream and forget it (already gone upstream is fine)."""
        self.push_host(target)
        session = self.uploads.claim(uuid, target, user)
        try:
            async with self._send(target, session.host, "DELETE", session.suffix) as up:
                await _upload_answered(up, (200, 202, 204, 404))
            self.uploads.close(session)
        finally:
            self.uploads.release(session)

    def _moved(self, session: UploadSession, up: Upstream) -> None:
        location = up.response.headers.get("Location")
        if location:
            session.move(location)

    def _failed(self, session: UploadSession, exc: BaseException) -> None:
        """After a failed request the local copy may hold bytes upstream does not.
        An upload upstream no longer knows (or refused to finish) is over."""
        session.drop_copy()
        if isinstance(exc, BlobUploadUnknown | DigestInvalid | SizeInvalid):
            self.uploads.close(session)
        elif not isinstance(exc, RangeNotSatisfiable | BlobUploadInvalid):
            session.offset = None  # ask upstream before trusting it again

    # -- manifests and deletes ----------------------------------------------------------

    async def put_manifest(
        self,
        target: Target,
        reference: str,
        body: bytes,
        media_type: str | None,
        user: str | None = None,
    ) -> PushedManifest:
        """`PUT …/manifests/<tag or digest>`: verified, forwarded, then stored."""
        host = self.push_host(target)
        if is_digest(reference):
            digest = Digest.parse(reference)
            if not digest.matches(body):
                actual = Digest.of(body, digest.algorithm)
                raise DigestInvalid(
                    f"manifest does not match {digest}: its {digest.algorithm} is {actual.hex}"
                )
        else:
            validate_tag(reference)
            digest = Digest.of(body)
        media_type = media_type or declared_media_type(body) or OCI_MANIFEST
        async with self._send(
            target,
            host,
            "PUT",
            f"manifests/{reference}",
            headers=[("Content-Type", media_type)],
            data=body,
        ) as up:
            await expect(
                up, "manifest", ok=(201,), not_found=ManifestUnknown, invalid=ManifestInvalid
            )
            announced = up.response.headers.get("Docker-Content-Digest")
            subject = up.response.headers.get("OCI-Subject")
        self.store.put(digest, body)
        if announced in (None, str(digest)):
            self.store.link(
                target.namespace.name, target.repository, digest, "_manifests", media_type
            )
        else:  # kept by its digest, but not served to this repository without asking
            log.warning("manifest.digest_differs", digest=str(digest), announced=announced)
        if not is_digest(reference) and self.on_tag_changed is not None:
            await self.on_tag_changed(target, reference)
        log.info(
            "manifest.pushed",
            digest=str(digest),
            repository=target.repository,
            reference=reference,
            host=host.host,
            user=user,
        )
        return PushedManifest(digest, host.host, subject)

    async def read_manifest(self, chunks: Chunks | None, length: int | None) -> bytes:
        """A pushed manifest's body, at most `max_manifest_size` bytes."""
        return await read_manifest(
            chunks, length=length, limit=self.max_manifest_size, source="pushed"
        )

    async def delete(
        self, target: Target, kind: Literal["manifests", "blobs"], reference: str
    ) -> str:
        """`DELETE` of a manifest (by tag or digest) or a blob, where allowed."""
        host = self.delete_host(target)
        if is_digest(reference):
            Digest.parse(reference)
        else:
            if kind == "blobs":
                raise DigestInvalid(f"a blob is deleted by digest, not {reference!r}")
            validate_tag(reference)
        async with self._send(
            target, host, "DELETE", f"{kind}/{reference}", actions="delete"
        ) as up:
            not_found = ManifestUnknown if kind == "manifests" else BlobUnknown
            await expect(
                up, kind[:-1], ok=(200, 202, 204), not_found=not_found, invalid=Unsupported
            )
        if is_digest(reference):
            link_kind: LinkKind = "_manifests" if kind == "manifests" else "_blobs"
            self.store.unlink(
                target.namespace.name, target.repository, Digest.parse(reference), link_kind
            )
        elif self.on_tag_changed is not None:
            await self.on_tag_changed(target, reference)
        log.info("deleted", kind=kind[:-1], reference=reference, host=host.host)
        return host.host

    # -- upstream -----------------------------------------------------------------------

    def _send(
        self,
        target: Target,
        host: RegistryHost,
        method: str,
        suffix: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        params: dict[str, str] | None = None,
        data: Body = None,
        scopes: tuple[str, ...] = (),
        actions: str = "pull,push",
    ) -> AbstractAsyncContextManager[Upstream]:
        """One request to the push host alone: an upload lives on one host."""
        return self.upstream.request(
            replace(target.namespace, hosts=(host,)),
            Capability.PUSH,
            method,
            target.repository,
            suffix,
            headers=headers or [],
            params=params,
            actions=actions,
            scopes=scopes,
            data=data,
        )


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
