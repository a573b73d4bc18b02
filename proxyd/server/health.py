"""Health endpoints for service managers and orchestrators, outside the registry API.

- `GET /healthz`: liveness. 200 while the process serves requests at all.
- `GET /readyz`: readiness. 200 once the core is set up (configuration loaded, store
  open) and the cache directory takes a new file; else 503 with the reason, so a
  load balancer or kubelet stops sending pulls to an instance that could not keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path

from aiohttp import web

from proxyd.server.keys import PULLER, REGISTRY


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    if REGISTRY not in app or PULLER not in app:
        return _unready("starting: the configuration or the store is not set up yet")
    problem = await asyncio.to_thread(cache_dir_problem, app[REGISTRY].settings.cache_dir)
    if problem is not None:
        return _unready(problem)
    return web.json_response({"status": "ok"})


def cache_dir_problem(cache_dir: Path) -> str | None:
    """None when a small file can be created (and removed) in `cache_dir/tmp`, where
    every download starts; else what went wrong."""
    probe = cache_dir / "tmp" / f".readyz-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        return _not_writable(cache_dir, exc)
    try:
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
    except OSError as exc:
        return _not_writable(cache_dir, exc)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def _not_writable(cache_dir: Path, exc: OSError) -> str:
    return f"cache directory {cache_dir / 'tmp'} is not writable: {exc.strerror or exc}"


def _unready(reason: str) -> web.Response:
    return web.json_response({"status": "unavailable", "reason": reason}, status=503)
