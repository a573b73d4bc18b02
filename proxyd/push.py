"""Writes through proxyd: where they may go, and the writes that are one request
each (a manifest PUT, a DELETE), forwarded with proxyd's own credentials. Blob
uploads, which span requests, are `proxyd.uploader`'s, built on this policy.

Policy: a namespace takes pushes only when allowed (`allow_push`), and only its
upstream server receives them, when it has the push capability; a mirror never
does. DELETE needs `allow_delete`. A pushed manifest is checked against its digest,
forwarded, then stored and linked to the repository, so pulling it back through
proxyd is served locally; a manifest written or deleted marks what the cache holds
about its repository (tags, tag lists, referrers) out of date.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Literal

import structlog

from proxyd.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    Unsupported,
)
from proxyd.exchange import Body
from proxyd.hosts import Capability, RegistryHost, Target
from proxyd.manifests import OCI_MANIFEST, declared_media_type, read_manifest
from proxyd.reference import Digest, is_digest, validate_tag
from proxyd.refusal import expect
from proxyd.runtime import RuntimeConfig
from proxyd.store import BlobStore, LinkKind
from proxyd.upstream import Upstream, UpstreamClient

log = structlog.get_logger("proxyd.push")

OCTET_STREAM = "application/octet-stream"

Chunks = AsyncIterable[bytes]


@dataclass
class PushedManifest:
    digest: Digest
    host: str
    subject: str | None  # upstream's OCI-Subject (a manifest with a subject)


class Pusher:
    def __init__(
        self,
        runtime: RuntimeConfig,
        store: BlobStore,
        upstream: UpstreamClient,
        *,
        max_manifest_size: int,
        on_repository_changed: Callable[[Target], Awaitable[None]] | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.upstream = upstream
        self.max_manifest_size = max_manifest_size
        # A manifest PUT or DELETE (tag or digest) moves tags, changes the tag list or
        # a subject's referrers: what the cache holds about the repository is now wrong.
        self.on_repository_changed = on_repository_changed

    # -- policy -------------------------------------------------------------------------

    def push_host(self, target: Target) -> RegistryHost:
        """The host pushes to `target` go to; Unsupported when there is none."""
        namespace = target.namespace
        if not self.runtime.push_allowed(namespace):
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
        async with self.send(
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
        if self.on_repository_changed is not None:
            await self.on_repository_changed(target)
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
        async with self.send(target, host, "DELETE", f"{kind}/{reference}", actions="delete") as up:
            not_found = ManifestUnknown if kind == "manifests" else BlobUnknown
            await expect(
                up, kind[:-1], ok=(200, 202, 204), not_found=not_found, invalid=Unsupported
            )
        if is_digest(reference):
            link_kind: LinkKind = "_manifests" if kind == "manifests" else "_blobs"
            self.store.unlink(
                target.namespace.name, target.repository, Digest.parse(reference), link_kind
            )
        if kind == "manifests" and self.on_repository_changed is not None:
            await self.on_repository_changed(target)
        log.info("deleted", kind=kind[:-1], reference=reference, host=host.host)
        return host.host

    # -- upstream -----------------------------------------------------------------------

    def send(
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
