"""The application factory: builds the core objects once and owns their lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxyd.breaker import Breakers
from proxyd.config import Registry
from proxyd.evict import Evictor
from proxyd.fetch import Puller
from proxyd.inbound import InboundAuth
from proxyd.metrics import CONTENT_TYPE, Metrics
from proxyd.push import Pusher
from proxyd.server import handlers, health, push
from proxyd.server.keys import METRICS, PULLER, REGISTRY
from proxyd.server.middleware import request_context
from proxyd.smallcache import SmallCache
from proxyd.store import BlobStore
from proxyd.upstream import UpstreamClient


def create_app(registry: Registry) -> web.Application:
    app = web.Application(middlewares=[request_context, push.inbound_auth], client_max_size=1 << 20)
    app[REGISTRY] = registry
    if registry.inbound_users is not None and registry.auth_required is not None:
        app[push.INBOUND] = InboundAuth(registry.inbound_users, registry.auth_required)
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_core)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", health.healthz)  # and HEAD
    app.router.add_get("/readyz", health.readyz)
    app.router.add_route("GET", "/v2/_catalog", handlers.catalog)
    app.router.add_route("GET", "/v2/", handlers.base)
    app.router.add_route("GET", "/v2", handlers.base)
    app.router.add_route("*", "/v2/{tail:.+}", handlers.api)
    return app


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _core(app: web.Application) -> AsyncIterator[None]:
    settings = app[REGISTRY].settings
    store = BlobStore(settings.cache_dir)
    store.open()
    small = (
        SmallCache.redis(settings.cache.redis_url)
        if settings.cache.backend == "redis"
        else SmallCache.sqlite(store.root / "small.sqlite")
    )
    evictor = Evictor(store, max_size=settings.cache.max_size, max_age=settings.cache.max_age)
    metrics = app[METRICS]
    metrics.watch(metrics.cache_bytes, lambda: evictor.stored_bytes)
    metrics.watch(metrics.cache_entries, lambda: evictor.stored_entries)
    breakers = Breakers(failures=settings.breaker_failures, cooldown=settings.breaker_cooldown)
    async with UpstreamClient(
        app[REGISTRY],
        user_agent=settings.user_agent,
        offline=settings.offline,
        breakers=breakers,
        metrics=metrics,
    ) as upstream:
        puller = Puller(
            store,
            upstream,
            small,
            max_manifest_size=settings.max_manifest_size,
            offline=settings.offline,
            on_commit=evictor.committed,
            metrics=metrics,
        )
        app[PULLER] = puller
        pusher = Pusher(
            app[REGISTRY],
            store,
            upstream,
            max_manifest_size=settings.max_manifest_size,
            upload_ttl=settings.upload_ttl,
            on_commit=evictor.committed,
            on_tag_changed=puller.tag_changed,
        )
        app[push.PUSHER] = pusher
        evictor.start()  # without limits it only measures the store, for the metrics
        pusher.start()
        try:
            yield
        finally:
            await evictor.stop()
            await pusher.close()
            await puller.close()
            await small.close()
