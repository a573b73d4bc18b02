"""The peer endpoint of a fleet node, outside `/v2/`: `GET /_proxyd/peers/blobs/<digest>`
streams a blob this node holds (sendfile, `Range` honoured) or is downloading (joined
as the bytes arrive, the last one held until the digest is verified), to a peer with
the fleet's secret, at most `fanout` peers at a time per blob (`proxyd.peergate`
decides both). It never fetches: a blob this node has not is a 404, and the peer
asks another source. Served only with `[cluster]`: on the main listener, or with
`[cluster] listen` on a listener of its own (`listener_app`), which serves nothing
else but `/healthz`, so the node's registry API can stay on the loopback while its
peers reach the blobs."""

from __future__ import annotations

from aiohttp import hdrs, web

from proxyd.download import Download
from proxyd.errors import BlobUnknown
from proxyd.reference import Digest
from proxyd.server import health, pull
from proxyd.server.keys import ACCESS, FLEET, METRICS, PULLER
from proxyd.server.middleware import API_VERSION_HEADER, request_context

ROUTE = "/_proxyd/peers/blobs/{digest}"


def listener_app(main: web.Application) -> web.Application:
    """The app of `[cluster] listen`: the peer endpoint and `/healthz` alone, on the
    objects of `main` (started already: its core is built)."""
    app = web.Application(middlewares=[request_context], client_max_size=1 << 10)
    app[FLEET], app[PULLER], app[METRICS] = main[FLEET], main[PULLER], main[METRICS]
    app.router.add_get(ROUTE, blob)  # and HEAD
    app.router.add_get("/healthz", health.healthz)
    return app


async def blob(request: web.Request) -> web.StreamResponse:
    access = request[ACCESS]
    access.route = "peers"
    gate = request.app[FLEET].gate
    gate.admit(request.headers.get(hdrs.AUTHORIZATION))
    digest = Digest.parse(request.match_info["digest"])
    found = request.app[PULLER].held_or_downloading(digest)
    if found is None:
        raise BlobUnknown(f"this node neither holds nor downloads {digest}")
    headers = {
        **API_VERSION_HEADER,
        hdrs.CONTENT_TYPE: "application/octet-stream",
        "Docker-Content-Digest": str(digest),
    }
    if request.method == hdrs.METH_HEAD:
        if found.size is not None:  # a download's, once its upstream answered
            headers[hdrs.CONTENT_LENGTH] = str(found.size)
        return web.Response(headers=headers)
    sent = request.app[METRICS].peer_sent_bytes
    with gate.stream(digest):
        if isinstance(found, Download):
            await found.answered()  # its upstream's answer: the size, or the failure
            cache = "hit" if found.verified else "miss"
            response = await pull.stream_download(request, found, headers, cache=cache)
            sent.inc(access.sent or 0)
            return response
        access.cache = "hit"
        stored = await pull.serve_stored(request, found, {**headers, pull.CACHE_HEADER: "hit"})
        await stored.prepare(request)  # sends the file while this peer holds its place
        sent.inc(stored.content_length or 0)
        return stored
