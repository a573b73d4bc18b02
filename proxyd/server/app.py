"""The application factory: builds the core objects once and owns their lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web

from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.core import open_core
from proxyd.inbound import InboundAuth
from proxyd.metrics import CONTENT_TYPE, Metrics
from proxyd.runtime import RuntimeConfig
from proxyd.server import health, peers, pull
from proxyd.server.fastpath import FAST, FastAnswers
from proxyd.server.keys import (
    FLEET,
    INBOUND,
    METRICS,
    PULLER,
    PUSHER,
    RELOADER,
    RESOLVER,
    RUNTIME,
    UPLOADER,
)
from proxyd.server.middleware import add_request_id, inbound_auth, request_context


def create_app(
    runtime: RuntimeConfig, *, clock: Clock = SYSTEM_CLOCK, preconnect: bool = False
) -> web.Application:
    """`clock`: the one the core and inbound auth read (a test's, to advance time);
    `preconnect`: the daemon's app asks its upstream hosts at start (open_core)."""
    app = web.Application(middlewares=[request_context, inbound_auth], client_max_size=1 << 20)
    app[RUNTIME] = runtime
    if runtime.inbound_users is not None and runtime.auth_required is not None:
        app[INBOUND] = InboundAuth(
            runtime.inbound_users, runtime.auth_required, clock=clock.monotonic
        )
    app[METRICS] = Metrics()
    # Remembered answers skip the middlewares: not where every pull must authenticate.
    every_pull_authenticates = INBOUND in app and runtime.auth_required == "all"
    app[FAST] = FastAnswers(app[METRICS], enabled=not every_pull_authenticates)
    app.on_response_prepare.append(add_request_id)
    app.cleanup_ctx.append(partial(_core, clock=clock, preconnect=preconnect))
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", health.healthz)  # and HEAD
    app.router.add_get("/readyz", health.readyz)
    cluster = runtime.settings.cluster
    if cluster is not None and cluster.listen is None:  # else on its own listener
        app.router.add_get(peers.ROUTE, peers.blob)  # and HEAD
    app.router.add_route("GET", "/v2/_catalog", pull.catalog)
    app.router.add_route("GET", "/v2/", pull.base)
    app.router.add_route("GET", "/v2", pull.base)
    app.router.add_route("*", "/v2/{tail:.+}", pull.api)
    return app


async def metrics_endpoint(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


async def _core(app: web.Application, *, clock: Clock, preconnect: bool) -> AsyncIterator[None]:
    async with open_core(app[RUNTIME], app[METRICS], clock=clock, preconnect=preconnect) as core:
        app[PULLER] = core.puller
        app[RESOLVER] = core.resolver
        app[FAST].manifest_memory = core.puller.manifest_memory
        app[PUSHER] = core.pusher
        app[UPLOADER] = core.uploader
        app[RELOADER] = core.reloader
        if core.fleet is not None:
            app[FLEET] = core.fleet
        if INBOUND in app:
            core.reloader.on_users = app[INBOUND].replace_users
        yield
