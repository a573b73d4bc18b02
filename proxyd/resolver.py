"""Answers that only a host trusted with `resolve` (or `referrers`) may give,
because nothing in them can be verified: what a tag points at, the tag lists, the
referrers of a subject, the catalog.

They are kept in the small-response cache and served by one policy
(`_through_cache`): a fresh answer is served as is; an old one is revalidated (a
`HEAD` for a tag: unchanged costs no body) or fetched again, once however many
clients ask; when every host fails, the old answer is served marked stale; offline,
answers of any age are served. A tag's manifest is stored by digest through the
`Puller`, which this room builds on (never the other way round).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.convert import convert_legacy_config
from proxyd.errors import (
    DigestInvalid,
    DigestMismatch,
    ManifestUnknown,
    NameUnknown,
    Offline,
    ProxydError,
    TooManyRequests,
    UpstreamError,
)
from proxyd.hosts import Capability, Namespace, Target
from proxyd.manifests import OCI_INDEX, Manifest, served_media_type
from proxyd.memory import TagMemory
from proxyd.metrics import Metrics
from proxyd.puller import Puller
from proxyd.reference import Digest
from proxyd.refusal import expect
from proxyd.singleflight import SingleFlight
from proxyd.smallcache import Entry, SmallCache
from proxyd.upstream import Upstream, UpstreamClient, read_body

log = structlog.get_logger("proxyd.resolver")
T = TypeVar("T")

MAX_REMEMBERED_TAGS = (
    4096  # fresh tag answers remembered (their manifests count in manifest_memory)
)


@dataclass
class Listing:
    """A tag list, the referrers of a subject, or the catalog: JSON passed on."""

    body: dict[str, Any]
    link: str | None  # the upstream's pagination Link
    cache: str
    host: str | None = None


class Resolver:
    def __init__(
        self,
        puller: Puller,
        upstream: UpstreamClient,
        small: SmallCache,
        *,
        offline: bool = False,
        tags_can_move: Callable[[Namespace], bool] = lambda namespace: True,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.puller = puller
        self.upstream = upstream
        self.small = small
        self.offline = offline
        # Whether a push or delete through proxyd may move a namespace's tags: only
        # then is a cached tag checked against the tag-changed mark (one more read).
        self.tags_can_move = tags_can_move
        self.metrics = metrics or Metrics()
        # A tag is answered from memory only while its manifest is: without manifest
        # memory there is nothing to remember tags with.
        self.tag_memory: TagMemory[Digest] = TagMemory(
            max_entries=MAX_REMEMBERED_TAGS if puller.manifest_memory.max_bytes > 0 else 0,
            clock=clock.monotonic,
        )
        self._flights: SingleFlight[Any] = SingleFlight(on_join=self.metrics.coalesced.inc)

    # -- tags ---------------------------------------------------------------------------

    async def tag(self, target: Target, tag: str, accept: list[str]) -> Manifest:
        """The manifest `tag` points at, for a client accepting `accept`."""
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

    async def tag_changed(self, target: Target, tag: str) -> None:
        """A push or delete through proxyd moved the tag: answers cached before now
        (for any Accept set, on any replica sharing the cache) are out of date."""
        await self.small.put(_tag_changed_key(target, tag), {})

    def _remembered_tag(self, target: Target, key: str) -> Manifest | None:
        remembered = self.tag_memory.get(key)
        if remembered is None:
            return None
        digest, until = remembered
        kept = self.puller.remembered(target, digest)
        if kept is None:
            return None
        self.metrics.cache.labels("tag", "hit").inc()
        body = kept.body
        fresh_until = min(until, kept.fresh_until)  # the tag and its manifest both stand
        return Manifest(digest, kept.media_type, len(body), body, "hit", None, fresh_until)

    def _remember_tag(self, target: Target, key: str, manifest: Manifest, fresh_for: float) -> None:
        """A fresh answer (its bytes verified, the repository's link made or on its way)."""
        self.puller.remember(target, manifest)
        self.tag_memory.put(key, manifest.digest, fresh_for)

    async def _refresh_tag(
        self, target: Target, tag: str, accept: list[str], key: str, entry: Entry | None
    ) -> Manifest:
        if entry is not None:
            async with self.upstream.ask(
                target, Capability.RESOLVE, "HEAD", f"manifests/{tag}", accept=accept
            ) as up:
                await expect(up, f"manifest {tag}", not_found=ManifestUnknown)
                announced = up.response.headers.get("Docker-Content-Digest")
            if announced == entry.value.get("upstream_digest", entry.value.get("digest")):
                await self.small.put(key, entry.value)  # unchanged: no body transferred
                return self._from_entry(target, entry, "revalidated", up.host.host)
        async with self.upstream.ask(
            target, Capability.RESOLVE, "GET", f"manifests/{tag}", accept=accept
        ) as up:
            await expect(up, f"manifest {tag}", not_found=ManifestUnknown)
            announced = up.response.headers.get("Docker-Content-Digest")
            body = await self.puller.read_manifest(up)
            media_type = served_media_type(up.response.headers.get("Content-Type"), body)
        digest = Digest.of(body, _announced(announced, up).algorithm if announced else "sha256")
        if announced and str(digest) != announced:
            self.metrics.digest_mismatches.labels(up.host.host).inc()
            raise DigestMismatch(announced, str(digest), host=up.host.host)
        self.puller.commit_manifest(target, digest, body, media_type)
        upstream_digest = digest
        converted = (
            convert_legacy_config(body, media_type)
            if target.namespace.convert_legacy_config
            else None
        )
        if converted is not None:  # the original stays stored under its own digest
            body = converted
            digest = Digest.of(body)
            self.puller.commit_manifest(target, digest, body, media_type)
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
        if not digest.matches(body):
            raise DigestMismatch(str(digest), "a cached tag record with other bytes")
        self.puller.keep_manifest(target, digest, body, media_type)
        return Manifest(digest, media_type, len(body), body, cache, host)

    # -- tag lists, referrers, the catalog ----------------------------------------------

    async def tags(self, target: Target, params: dict[str, str]) -> Listing:
        key = f"tags {target.namespace.name} {target.repository} {sorted(params.items())}"
        return await self._through_cache(
            target,
            key,
            "tags",
            "the tag list",
            refresh=lambda _: self._fetch_tags(target, params, key),
            from_entry=lambda entry, cache: Listing(
                entry.value["body"], entry.value.get("link"), cache
            ),
        )

    async def _fetch_tags(self, target: Target, params: dict[str, str], key: str) -> Listing:
        async with self.upstream.ask(
            target, Capability.RESOLVE, "GET", "tags/list", params=params
        ) as up:
            await expect(up, f"repository {target.repository}", not_found=NameUnknown)
            body = await self._read_json(up)
            link = up.response.headers.get("Link")
        await self.small.put(key, {"body": body, "link": link})
        return Listing(body, link, "miss", up.host.host)

    async def referrers(self, target: Target, digest: Digest, artifact_type: str | None) -> Listing:
        """OCI 1.1 referrers, cached like tags; a registry without the API (404) is
        asked for the referrers tag schema (`sha256-<hex>`), as the spec describes."""
        key = f"referrers {target.namespace.name} {target.repository} {digest} {artifact_type}"
        return await self._through_cache(
            target,
            key,
            "referrers",
            f"the referrers of {digest}",
            refresh=lambda _: self._fetch_referrers(target, digest, artifact_type, key),
            from_entry=lambda entry, cache: Listing(entry.value["body"], None, cache),
        )

    async def _fetch_referrers(
        self, target: Target, digest: Digest, artifact_type: str | None, key: str
    ) -> Listing:
        params = {"artifactType": artifact_type} if artifact_type else None
        host, body, filtered = "", None, False
        if target.namespace.hosts_for(Capability.REFERRERS):  # else: the tag schema only
            async with self.upstream.ask(
                target,
                Capability.REFERRERS,
                "GET",
                f"referrers/{digest}",
                accept=[OCI_INDEX],
                params=params,
            ) as up:
                host = up.host.host
                if up.response.status != 404:
                    await expect(up, f"referrers of {digest}", not_found=ManifestUnknown)
                    body = await self._read_json(up)
                    filtered = "artifactType" in up.response.headers.get("OCI-Filters-Applied", "")
        if body is None:  # no referrers API: the tag schema
            body, host = await self._referrers_tag(target, digest)
        if artifact_type and not filtered:
            body["manifests"] = [
                m
                for m in body.get("manifests", [])
                if isinstance(m, dict) and m.get("artifactType") == artifact_type
            ]
        await self.small.put(key, {"body": body})
        return Listing(body, None, "miss", host)

    async def _referrers_tag(self, target: Target, digest: Digest) -> tuple[dict[str, Any], str]:
        """The referrers tag schema, asked of the referrers hosts (or, when no host
        has that capability, the resolve hosts); and the host that answered."""
        tag = f"{digest.algorithm}-{digest.hex}"
        capability = target.namespace.referrers_tag_capability
        async with self.upstream.ask(
            target, capability, "GET", f"manifests/{tag}", accept=[OCI_INDEX]
        ) as up:
            if up.response.status == 404:
                return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}, up.host.host
            await expect(up, f"referrers tag {tag}", not_found=ManifestUnknown)
            return await self._read_json(up), up.host.host

    async def catalog(self, namespace: Namespace, params: dict[str, str]) -> Listing:
        """`/v2/_catalog`, passed to the upstream where it allows it; not cached."""
        target = Target(namespace, "")
        async with self.upstream.ask(
            target, Capability.RESOLVE, "GET", "_catalog", params=params
        ) as up:
            await expect(up, "the catalog", not_found=NameUnknown)
            body = await self._read_json(up)
            return Listing(body, up.response.headers.get("Link"), "miss", up.host.host)

    async def _read_json(self, up: Upstream) -> dict[str, Any]:
        try:
            body = json.loads(await read_body(up, self.puller.max_manifest_size))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise UpstreamError(f"{up.host.host} sent an answer that is not a JSON object")
        return body

    # -- the small-response policy ------------------------------------------------------

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
        """A fresh entry is served; an old one is revalidated or refetched (once,
        however many ask); when every host fails, an old entry is served marked
        stale. --offline serves entries of any age."""
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
            result: T = await self._flights.run(key, lambda: refresh(entry))
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
