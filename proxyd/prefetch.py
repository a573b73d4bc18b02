"""`proxyd prefetch IMAGE…`: warm the cache before an outage or an air gap.

Each reference is resolved through its namespace's chain, then the manifests of every
platform (or those asked for) and all their blobs are pulled into the store, exactly
as a client's pull through proxyd would: verified, linked, shared with concurrent
requests. Progress goes to a terminal as bars, elsewhere as log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxyd.download import Download, OnDisk
from proxyd.errors import NameUnknown, ProxydError
from proxyd.hosts import Target
from proxyd.manifests import MANIFEST_TYPES, Manifest
from proxyd.puller import Joined, Puller, StoredBlob
from proxyd.reference import Digest, ImageReference, is_digest, parse_image_reference
from proxyd.resolver import Resolver
from proxyd.runtime import RuntimeConfig

PARALLEL_BLOBS = 4


@dataclass
class Summary:
    images: int = 0
    manifests: int = 0
    blobs_fetched: int = 0
    blobs_cached: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class Progress:
    """What prefetch reports; the CLI renders it as bars or as log lines."""

    def blob_started(self, digest: Digest, size: int | None) -> None: ...
    def blob_advanced(self, digest: Digest, size: int) -> None: ...
    def blob_done(self, digest: Digest, cached: bool) -> None: ...
    def image_done(self, image: ImageReference, digest: Digest) -> None: ...


def platform_matches(descriptor: dict[str, Any], wanted: list[str]) -> bool:
    """`linux/amd64` or `linux/arm64/v8` against an index entry's platform."""
    if not wanted:
        return True
    platform = descriptor.get("platform") or {}
    parts = [platform.get("os", ""), platform.get("architecture", "")]
    if platform.get("variant"):
        parts.append(platform["variant"])
    have = "/".join(parts)
    return any(have == w or have.startswith(w + "/") for w in wanted)


async def prefetch(
    resolver: Resolver,
    runtime: RuntimeConfig,
    references: list[str],
    *,
    platforms: list[str],
    progress: Progress,
    clock: Callable[[], float] = time.monotonic,
) -> Summary:
    summary = Summary()
    started = clock()
    for text in references:
        try:
            image = parse_image_reference(text, runtime.settings.default_namespace)
            namespace = runtime.namespace(image.namespace)
            if namespace is None:
                raise NameUnknown(f"namespace {image.namespace!r} is not configured in proxyd")
            target = Target(namespace, image.repository)
            top = await _top_manifest(resolver, target, image.reference)
            summary.manifests += 1
            await _walk(resolver.puller, target, json.loads(top.body), platforms, progress, summary)
            summary.images += 1
            progress.image_done(image, top.digest)
        except (ProxydError, ValueError, KeyError, TypeError) as exc:
            message = exc.message if isinstance(exc, ProxydError) else f"bad manifest: {exc}"
            summary.failures.append(f"{text}: {message}")
    summary.seconds = clock() - started
    return summary


async def _top_manifest(resolver: Resolver, target: Target, reference: str) -> Manifest:
    """The image's manifest: by tag from the resolver, by digest from the puller."""
    if is_digest(reference):
        return await resolver.puller.manifest(target, Digest.parse(reference), list(MANIFEST_TYPES))
    return await resolver.tag(target, reference, list(MANIFEST_TYPES))


async def _walk(
    puller: Puller,
    target: Target,
    manifest: dict[str, Any],
    platforms: list[str],
    progress: Progress,
    summary: Summary,
) -> None:
    if isinstance(manifest.get("manifests"), list):  # an index: one manifest per platform
        for entry in manifest["manifests"]:
            if platform_matches(entry, platforms):
                digest = Digest.parse(entry["digest"])
                child = await puller.manifest(target, digest, list(MANIFEST_TYPES))
                summary.manifests += 1
                await _walk(puller, target, json.loads(child.body), platforms, progress, summary)
        return
    descriptors = [manifest["config"], *manifest.get("layers", [])]
    limit = asyncio.Semaphore(PARALLEL_BLOBS)

    async def one(descriptor: dict[str, Any]) -> None:
        async with limit:
            await _fetch_blob(puller, target, Digest.parse(descriptor["digest"]), progress, summary)

    await asyncio.gather(*(one(d) for d in descriptors))


async def _fetch_blob(
    puller: Puller, target: Target, digest: Digest, progress: Progress, summary: Summary
) -> None:
    result = await puller.blob(target, digest, head=False)
    if isinstance(result, StoredBlob | Joined):
        summary.blobs_cached += 1
        progress.blob_done(digest, cached=True)
        return
    assert isinstance(result, Download)
    progress.blob_started(digest, result.size)
    # Spans of the file, never read: only the progress is wanted here.
    async with contextlib.aclosing(result.pieces(spans=True)) as pieces:
        async for piece in pieces:
            size = piece.length if isinstance(piece, OnDisk) else len(piece)
            progress.blob_advanced(digest, size)
            summary.bytes_fetched += size
    summary.blobs_fetched += 1
    progress.blob_done(digest, cached=False)


class LogProgress(Progress):
    """One log event per blob and per image, for journals and CI logs."""

    def __init__(self) -> None:
        import structlog

        self.log = structlog.get_logger("proxyd.prefetch")

    def blob_done(self, digest: Digest, cached: bool) -> None:
        self.log.info("prefetch.blob", digest=str(digest), cached=cached)

    def image_done(self, image: ImageReference, digest: Digest) -> None:
        self.log.info("prefetch.image", image=str(image), digest=str(digest))


class BarProgress(Progress):
    """A bar per blob in flight, on a terminal (rich)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bars

        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            transient=False,
        )
        self.tasks: dict[Digest, Any] = {}

    def __enter__(self) -> BarProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def blob_started(self, digest: Digest, size: int | None) -> None:
        self.tasks[digest] = self.bars.add_task(digest.hex[:12], total=size)

    def blob_advanced(self, digest: Digest, size: int) -> None:
        self.bars.advance(self.tasks[digest], size)

    def blob_done(self, digest: Digest, cached: bool) -> None:
        if cached:
            self.bars.console.print(f"{digest.hex[:12]} already cached")

    def image_done(self, image: ImageReference, digest: Digest) -> None:
        self.bars.console.print(f"[bold]{image}[/bold] → {digest}")
