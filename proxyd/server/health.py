"""Health endpoints for service managers and orchestrators, outside the registry API.

- `GET /healthz`: liveness. 200 while the process serves requests at all.
- `GET /readyz`: readiness. 200 once the core is set up (configuration loaded, store
  open) and the cache directory takes a new file; else 503 with the reason, so a
  load balancer or kubelet stops sending pulls to an instance that could not keep them.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxyd.server.keys import PULLER, RUNTIME


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    if RUNTIME not in app or PULLER not in app:
        return _unready("starting: the configuration or the store is not set up yet")
    problem = await asyncio.to_thread(app[PULLER].store.probe_writable)
    if problem is not None:
        return _unready(problem)
    return web.json_response({"status": "ok"})


def _unready(reason: str) -> web.Response:
    return web.json_response({"status": "unavailable", "reason": reason}, status=503)
