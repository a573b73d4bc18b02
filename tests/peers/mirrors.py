"""Mirrors that misbehave on purpose, recording every request they receive.

``FaultyMirror(mode)`` answers every ``/v2/<name>/…`` request by ``mode``:

- ``"404"``: ``MANIFEST_UNKNOWN``/``BLOB_UNKNOWN``, as a mirror lacking the image does;
- ``"500"``: an internal server error;
- ``"401"``: a Basic challenge for a realm of its own (credentials must not follow);
- ``"hang"``: accepts the request and never answers (until ``hang_seconds`` pass or
  the mirror stops), for testing read timeouts.

``GET /v2/`` answers 200 in every mode but ``hang``, like a live registry.  Runs in
a background thread, so synchronous tests can drive real clients against it.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from aiohttp import web

from tests.peers.httpserver import (
    RecordedRequest,
    RequestLog,
    ThreadedServer,
    ThreadedService,
    record,
)

Mode = Literal["404", "500", "401", "hang"]


class FaultyMirror(ThreadedService):
    def __init__(self, mode: Mode, *, hang_seconds: float = 60.0) -> None:
        self.mode = mode
        self.hang_seconds = hang_seconds
        self.requests = RequestLog()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = ThreadedServer(app, name=f"faulty-mirror-{mode}")

    @property
    def host(self) -> str:
        return self.url.removeprefix("http://")

    def recorded(self) -> list[RecordedRequest]:
        return self.requests.snapshot()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await record(request, self.requests)
        if self.mode == "hang":
            await asyncio.sleep(self.hang_seconds)
            raise web.HTTPGatewayTimeout(text="faulty mirror stopped hanging")
        if request.path in ("/v2", "/v2/"):
            return web.json_response(
                {}, headers={"Docker-Distribution-Api-Version": "registry/2.0"}
            )
        if self.mode == "404":
            code = "BLOB_UNKNOWN" if "/blobs/" in request.path else "MANIFEST_UNKNOWN"
            return web.json_response(
                {"errors": [{"code": code, "message": "not on this mirror"}]}, status=404
            )
        if self.mode == "401":
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "mirror wants credentials"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="faulty-mirror"'},
            )
        return web.json_response(
            {"errors": [{"code": "UNKNOWN", "message": "faulty mirror failed"}]}, status=500
        )
