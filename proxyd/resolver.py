"""Answers that only a host trusted with `resolve` (or `referrers`) may give,
because nothing in them can be verified: what a tag points at, the tag lists, the
referrers of a subject, the catalog.

They are kept in the small-response cache and served by one policy
(proxyd.cachepolicy): a fresh answer is served as is; an old one is revalidated (a
`HEAD` for a tag: unchanged costs no body) or fetched again, once however many
clients ask; when every host fails, the old answer is served marked stale; offline,
answers of any age are served. A tag has one record whatever the client accepts,
holding every answer upstream gave for it (proxyd.tagrecord); a client gets the first
it may take (proxyd.negotiation). A tag's manifest is stored by digest through the
`Puller`, which this room builds on (never the other way round).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from proxyd.cachepolicy import CachePolicy
from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.convert import convert_legacy_config
from proxyd.errors import (
    DigestInvalid,
    DigestMismatch,
    ManifestUnknown,
    NameUnknown,
    UpstreamError,
)
from proxyd.hosts import Capability, Namespace, Target
from proxyd.manifests import OCI_INDEX, Manifest, served_media_type
from proxyd.memory import TagMemory
from proxyd.metrics import Metrics
from proxyd.negotiation import Accept, upstream_accept
from proxyd.puller import Puller
from proxyd.reference import Digest
from proxyd.refusal import expect
from proxyd.smallcache import Entry, SmallCache
from proxyd.tagrecord import Answer, CachedAnswer, TagRecord
from proxyd.upstream import Upstream, UpstreamClient, read_body

log = structlog.get_logger("proxyd.resolver")
T = TypeVar("T")

# Fresh tags remembered (their manifests count in manifest_memory).
MAX_REMEMBERED_TAGS = 4096


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
        # Whether a push or delete through proxyd may change a namespace's repositories:
        # only then is a cached answer checked against the mark one leaves (one read).
        self.tags_can_move = tags_can_move
        self.metrics = metrics or Metrics()
        # A tag is answered from memory only while its manifest is: without manifest
        # memory there is nothing to remember tags with.
        self.tag_memory: TagMemory[tuple[Answer, ...]] = TagMemory(
            max_entries=MAX_REMEMBERED_TAGS if puller.manifest_memory.max_bytes > 0 else 0,
            clock=clock.monotonic,
        )
        self.policy = CachePolicy(small, offline=offline, metrics=self.metrics)

    # -- tags ---------------------------------------------------------------------------

    async def tag(self, target: Target, tag: str, accept: list[str]) -> Manifest:
        """The manifest `tag` points at, for a client accepting `accept`: the first
        answer of the tag's record it may take (proxyd.tagrecord), else upstream's."""
        client = Accept.parse(accept)
        key = _tag_key(target, tag)
        # Where no push or delete through proxyd can move a tag, only its TTL ends an
        # answer, so this process may remember it; elsewhere every answer is checked
        # against the mark such a write leaves, which another replica may have left.
        remember = not self.tags_can_move(target.namespace)
        if remember and (remembered := self._remembered_tag(target, key, client)) is not None:
            return remembered
        ttl = target.namespace.tag_ttl

        async def refresh(entry: Entry | None, fresh: bool) -> _Resolved:
            resolved = await self._refresh_tag(target, tag, client, entry, fresh)
            if remember:
                age = self.small.now() - resolved.stored_at
                self._remember_tag(target, key, resolved, ttl - age)
            return resolved

        def from_entry(entry: Entry, cache: str) -> _Resolved | None:
            record = self._record(target, entry)
            chosen = record.for_client(client) if record is not None else None
            if record is None or chosen is None:
                return None
            resolved = _Resolved(
                self._from_answer(target, chosen, cache), chosen, record, entry.stored_at
            )
            if remember and cache == "hit":
                self._remember_tag(target, key, resolved, ttl - entry.age(self.small.now()))
            return resolved

        resolved = await self.policy.answer(
            target,
            key,
            "tag",
            f"tag {tag}",
            changed_key=None if remember else _changed_key(target),
            refresh=refresh,
            from_entry=from_entry,
            fits=lambda resolved: resolved.answer.serves(client),
            question=client.key,
        )
        return resolved.manifest

    async def repository_changed(self, target: Target) -> None:
        """A push or delete through proxyd changed the repository (a tag, a manifest
        by digest, a referrer): its tags, tag lists and referrers cached before now
        are out of date, on every replica sharing the cache."""
        await self.small.put(_changed_key(target), {})

    def _remembered_tag(self, target: Target, key: str, client: Accept) -> Manifest | None:
        remembered = self.tag_memory.get(key)
        if remembered is None:
            return None
        answers, until = remembered
        chosen = next((a for a in answers if a.serves(client)), None)
        if chosen is None:
            return None
        kept = self.puller.remembered(target, chosen.digest)
        if kept is None:
            return None
        self.metrics.cache.labels("tag", "hit").inc()
        body = kept.body
        fresh_until = min(until, kept.fresh_until)  # the tag and its manifest both stand
        return Manifest(chosen.digest, kept.media_type, len(body), body, "hit", None, fresh_until)

    def _remember_tag(self, target: Target, key: str, resolved: _Resolved, ttl: float) -> None:
        """A fresh answer (its bytes verified, the repository's link made or on its way),
        for at most `ttl` seconds more."""
        self.puller.remember(target, resolved.manifest)
        self.tag_memory.put(key, resolved.record.light(), ttl)

    async def _refresh_tag(
        self, target: Target, tag: str, client: Accept, entry: Entry | None, fresh: bool
    ) -> _Resolved:
        """Upstream asked about the tag for `client`: a record that is old is first
        revalidated (one HEAD, with the Accept of the answer it compares); a record
        still fresh, or confirmed, that holds nothing this client may take gets the
        client's own answer beside the others."""
        key = _tag_key(target, tag)
        record = self._record(target, entry) if entry is not None else None
        stored_at = entry.stored_at if entry is not None else 0.0
        if record is not None and not fresh:
            first, suffix = record.first, f"manifests/{tag}"
            accept = first.asked_with.values
            async with self.upstream.ask(
                target, Capability.RESOLVE, "HEAD", suffix, accept=accept
            ) as up:
                await expect(up, f"manifest {tag}", not_found=ManifestUnknown)
                announced = up.response.headers.get("Docker-Content-Digest")
            if announced != str(first.upstream_digest):
                record = None  # the tag moved: every answer it had is out of date
            else:  # unchanged: no body transferred, and every answer stands
                stored_at = self.small.now()
                await self.small.put(key, record.to_value(), stored_at=stored_at)
                chosen = record.for_client(client)
                if chosen is not None:
                    manifest = self._from_answer(target, chosen, "revalidated", up.host.host)
                    return _Resolved(manifest, chosen, record, stored_at)
        answer, host = await self._fetch_tag(target, tag, client)
        if record is None:
            record, stored_at = TagRecord((answer,)), self.small.now()
        else:  # beside the others; the record's age stands (its first was not asked)
            record = record.beside(answer)
        await self.small.put(key, record.to_value(), stored_at=stored_at)
        body = answer.body
        manifest = Manifest(answer.digest, answer.media_type, len(body), body, "miss", host)
        return _Resolved(manifest, answer, record, stored_at)

    async def _fetch_tag(
        self, target: Target, tag: str, client: Accept
    ) -> tuple[CachedAnswer, str]:
        """The tag's manifest as upstream answers `client`, verified and stored."""
        asked_with = upstream_accept(client)
        async with self.upstream.ask(
            target, Capability.RESOLVE, "GET", f"manifests/{tag}", accept=asked_with.values
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
        return CachedAnswer(digest, media_type, asked_with, upstream_digest, body), up.host.host

    def _record(self, target: Target, entry: Entry) -> TagRecord | None:
        """The entry's tag record; None (logged) for one this proxyd does not read."""
        try:
            return TagRecord.from_value(entry.value)
        except ValueError as exc:
            log.warning(
                "cache.record_ignored",
                namespace=target.namespace.name,
                repository=target.repository,
                reason=str(exc),
            )
            return None

    def _from_answer(
        self, target: Target, answer: CachedAnswer, cache: str, host: str | None = None
    ) -> Manifest:
        """A cached answer (its bytes were checked as the record was read), now also
        in this replica's store."""
        self.puller.keep_manifest(target, answer.digest, answer.body, answer.media_type)
        body = answer.body
        return Manifest(answer.digest, answer.media_type, len(body), body, cache, host)

    # -- tag lists, referrers, the catalog ----------------------------------------------

    async def tags(self, target: Target, params: dict[str, str]) -> Listing:
        key = f"tags {target.namespace.name} {target.repository} {sorted(params.items())}"
        return await self.policy.answer(
            target,
            key,
            "tags",
            "the tag list",
            changed_key=self._changed_key_where_writable(target),
            refresh=lambda _, __: self._fetch_tags(target, params, key),
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
        return await self.policy.answer(
            target,
            key,
            "referrers",
            f"the referrers of {digest}",
            changed_key=self._changed_key_where_writable(target),
            refresh=lambda _, __: self._fetch_referrers(target, digest, artifact_type, key),
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

    def _changed_key_where_writable(self, target: Target) -> str | None:
        """The mark a write through proxyd leaves, where one can (see tag())."""
        return _changed_key(target) if self.tags_can_move(target.namespace) else None


@dataclass(frozen=True)
class _Resolved:
    """A tag's answer for one client, with the record it came from and the time that
    record was last confirmed by upstream."""

    manifest: Manifest
    answer: CachedAnswer
    record: TagRecord
    stored_at: float


def _changed_key(target: Target) -> str:
    return f"repository-changed {target.namespace.name} {target.repository}"


def _tag_key(target: Target, tag: str) -> str:
    """One record per tag, whatever the client accepts (older releases put the Accept
    set in the key; those records are never read)."""
    return f"tag {target.namespace.name} {target.repository} {tag}"


def _announced(header: str, up: Upstream) -> Digest:
    """A registry's Docker-Content-Digest; a malformed one is its fault, not the client's."""
    try:
        return Digest.parse(header)
    except DigestInvalid:
        raise UpstreamError(f"{up.host.host} announced a malformed digest {header!r}") from None
