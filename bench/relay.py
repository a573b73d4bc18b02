"""An HTTP relay in front of a registry, run as its own process.

It stands for the network between a proxy and its upstream, in three roles:

- a slow upstream: ``--rate`` paces every response body (bytes per second, per
  connection), so a proxy that buffers a whole blob before sending shows it in its
  time to first byte;
- a witness: it counts the requests it relays (``GET /_relay/stats``), which tells
  how many GETs of one blob a proxy sent upstream;
- one address for a registry and its token server (``--token-target``): drayage
  refuses a token realm on another host or port than its upstream.

Unpaced, it forwards whatever it has read, up to a megabyte at a time: it stands for
the network, which costs a real proxy's machine no CPU, so it takes as little of the
CPU the proxies and clients share as it can (in 64 KiB chunks it took 0.20 s of CPU
per pull of the 81 MiB image, 0.11-0.14 s this way).

It runs in its own process so that its event loop never competes with the measuring
client for the benchmark's GIL. It listens on 127.0.0.1 only, prints ``LISTENING
<port>`` once bound, and exits when its parent dies or ``--max-seconds`` pass.

    python -m bench.relay --target http://127.0.0.1:5000 [--rate 4194304]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

CHUNK = 64 * 1024  # the pace of a paced relay
READ_BUFFER = 1 << 20  # an unpaced relay forwards whatever it has read, up to this
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


class Relay:
    def __init__(self, target: str, token_target: str | None, rate: float) -> None:
        self.target = target.rstrip("/")
        self.token_target = token_target.rstrip("/") if token_target else None
        self.rate = rate
        self.counts: collections.Counter[str] = collections.Counter()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.cleanup_ctx.append(self._session)
        app.router.add_get("/_relay/stats", self.stats)
        app.router.add_post("/_relay/reset", self.reset)
        app.router.add_route("*", "/{tail:.*}", self.relay)
        return app

    async def _session(self, app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            read_bufsize=READ_BUFFER if self.rate <= 0 else CHUNK,
        ) as session:
            app[SESSION] = session
            yield

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(dict(self.counts))

    async def reset(self, request: web.Request) -> web.Response:
        self.counts.clear()
        return web.json_response({})

    async def relay(self, request: web.Request) -> web.StreamResponse:
        self.counts[f"{request.method} {request.path}"] += 1
        base = self.target
        if self.token_target is not None and request.path == "/token":
            base = self.token_target
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        body = await request.read() if request.can_read_body else None
        upstream = await request.app[SESSION].request(
            request.method,
            base + request.path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
        )
        async with upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            started, sent = time.monotonic(), 0
            body = (
                upstream.content.iter_chunked(CHUNK)
                if self.rate > 0
                else upstream.content.iter_any()
            )
            async for chunk in body:
                await response.write(chunk)
                sent += len(chunk)
                if self.rate > 0:
                    ahead = started + sent / self.rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            await response.write_eof()
            return response


async def serve(args: argparse.Namespace) -> None:
    relay = Relay(args.target, args.token_target, args.rate)
    runner = web.AppRunner(relay.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    port = runner.addresses[0][1]
    print(f"LISTENING {port}", flush=True)
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    try:
        # Polling is the point: nothing signals a parent's death to an event loop.
        while os.getppid() == parent and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="registry origin, http://127.0.0.1:PORT")
    parser.add_argument("--token-target", help="origin that answers /token")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes per second, 0: no limit")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    for url in (args.target, args.token_target):
        if url is not None and not url.startswith("http://127.0.0.1:"):
            sys.exit(f"relay: refusing {url!r}; the benchmark only talks to 127.0.0.1")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
