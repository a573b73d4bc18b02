"""The core objects of a running proxyd, built once from the configuration and closed
in order: the store, the small-response cache, eviction, the upstream client, the
puller, the resolver, the pusher and the uploader, the reloader of credentials, and
with `[cluster]` this node's part in the fleet (its upload sessions then in Redis). The HTTP app and
`proxyd prefetch` both run on it. One clock reaches every component that reads the
time (proxyd.clock), so a test can advance it for the whole core."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from proxyd.background import stop_loop
from proxyd.breaker import Breakers
from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.evict import Evictor
from proxyd.fleet import Fleet
from proxyd.fleetpull import FleetPulls
from proxyd.fleetuploads import SharedUploads
from proxyd.metrics import Metrics
from proxyd.preconnect import start as start_preconnect
from proxyd.puller import Puller
from proxyd.push import Pusher
from proxyd.reload import Reloader
from proxyd.resolver import Resolver
from proxyd.runtime import RuntimeConfig
from proxyd.smallcache import SmallCache
from proxyd.store import BlobStore
from proxyd.uploader import Uploader
from proxyd.uploads import UploadSessions, UploadTracker
from proxyd.upstream import UpstreamClient


@dataclass
class Core:
    runtime: RuntimeConfig
    store: BlobStore
    small: SmallCache
    evictor: Evictor
    upstream: UpstreamClient
    puller: Puller
    resolver: Resolver
    pusher: Pusher
    uploader: Uploader
    metrics: Metrics
    reloader: Reloader
    fleet: Fleet | None = None  # with [cluster]


@asynccontextmanager
async def open_core(
    runtime: RuntimeConfig,
    metrics: Metrics | None = None,
    *,
    clear_tmp: bool = True,
    join_fleet: bool = True,
    preconnect: bool = False,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[Core]:
    """`clear_tmp=False` for a process beside the daemon (prefetch): see BlobStore.open;
    `join_fleet=False` too: with `[cluster]` the daemon is the fleet's node, and a second
    process under its address would take its place in the directory. `preconnect`: the
    daemon's, which asks its upstream hosts `GET /v2/` at start where the `preconnect`
    setting allows (proxyd.preconnect); a command that makes its requests at once
    gains nothing from it."""
    settings = runtime.settings
    metrics = metrics or Metrics()
    store = BlobStore(settings.cache_dir, direct_writes=settings.cache.direct_writes)
    store.open(clear_tmp=clear_tmp)
    small = (
        SmallCache.redis(
            settings.cache.redis_url,
            clock=clock.time,
            timeout=settings.cache.redis_timeout,
            monotonic=clock.monotonic,
        )
        if settings.cache.backend == "redis"
        else SmallCache.sqlite(store.small_cache_path, clock=clock.time)
    )
    evictor = Evictor(
        store,
        max_size=settings.cache.max_size,
        max_age=settings.cache.max_age,
        small=small,
        clock=clock,
    )
    metrics.watch(metrics.cache_bytes, lambda: evictor.stored_bytes)
    metrics.watch(metrics.cache_entries, lambda: evictor.stored_entries)
    breakers = Breakers(
        failures=settings.breaker_failures,
        cooldown=settings.breaker_cooldown,
        clock=clock.monotonic,
    )
    fleet = None
    if join_fleet and settings.cluster is not None and runtime.peer_secret is not None:
        fleet = Fleet.build(
            settings.cluster,
            runtime.peer_secret.get_secret_value(),
            metrics=metrics,
            user_agent=settings.user_agent,
        )
    async with UpstreamClient(
        runtime,
        user_agent=settings.user_agent,
        offline=settings.offline,
        breakers=breakers,
        metrics=metrics,
        clock=clock,
        retry_max_wait=settings.retry_max_wait,
        max_manifest_size=settings.max_manifest_size,
    ) as upstream:
        puller = Puller(
            store,
            upstream,
            max_manifest_size=settings.max_manifest_size,
            manifest_memory=settings.cache.manifest_memory,
            on_commit=evictor.committed,
            metrics=metrics,
            clock=clock,
        )
        if fleet is not None:
            puller.fleet = FleetPulls(
                fleet.directory, fleet.peers, upstream, store, metrics=metrics
            )
            evictor.on_removed = puller.fleet.dropped
        resolver = Resolver(
            puller,
            upstream,
            small,
            offline=settings.offline,
            tags_can_move=lambda ns: runtime.push_allowed(ns) or ns.allow_delete,
            metrics=metrics,
            clock=clock,
        )
        pusher = Pusher(
            runtime,
            store,
            upstream,
            max_manifest_size=settings.max_manifest_size,
            on_repository_changed=resolver.repository_changed,
        )
        sessions: UploadSessions = (
            UploadTracker(settings.upload_ttl, clock=clock.monotonic)
            if fleet is None
            else SharedUploads(
                fleet.redis, ttl=settings.upload_ttl, namespaces=runtime.namespace, clock=clock.time
            )
        )
        uploader = Uploader(pusher, sessions, on_commit=evictor.committed)
        reloader = Reloader(runtime, interval=settings.credential_refresh, clock=clock)
        upstream.on_refused = reloader.refused
        warming = (
            start_preconnect(upstream, runtime) if preconnect and settings.preconnect else None
        )
        evictor.start()  # without limits it only measures the store, for the metrics
        uploader.start()
        reloader.start()
        try:
            await small.open()
            if fleet is not None:
                await fleet.start()
            yield Core(
                runtime,
                store,
                small,
                evictor,
                upstream,
                puller,
                resolver,
                pusher,
                uploader,
                metrics,
                reloader,
                fleet,
            )
        finally:
            await stop_loop(warming)
            await reloader.stop()
            await evictor.stop()
            await uploader.close()
            await puller.close()
            if fleet is not None:  # after its users: the uploads' expiry, the downloads
                await fleet.close()
            await small.close()
