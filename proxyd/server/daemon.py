"""Running the HTTP server as a daemon (`proxyd serve`): listen on the sockets systemd
passed or on `listen`, with TLS if configured, tell systemd when serving starts and
stops, take SIGTERM/SIGINT as a graceful stop and SIGHUP as a reload. The lifecycle
lives here, beside the app it runs, so the command line only parses and dispatches."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import ssl
from typing import TYPE_CHECKING, Literal

from aiohttp import web

from proxyd import heap, systemd, tls
from proxyd.config import Settings, split_listen
from proxyd.runtime import RuntimeConfig
from proxyd.server import peers
from proxyd.server.app import create_app
from proxyd.server.fastpath import ProxydRunner
from proxyd.server.keys import FLEET, METRICS, RELOADER
from proxyd.server.limits import LimitedRunner, Limits
from proxyd.server.middleware import AccessLogger

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger as BoundLogger

SHUTDOWN_GRACE = 5.0  # seconds; twice this stays under the unit's TimeoutStopSec=20s


def serve(runtime: RuntimeConfig) -> int:
    """The daemon's exit status: 0 after a stop by signal, 1 when it could not start."""
    from proxyd.log import configure

    settings = runtime.settings
    configure(settings.log_level, settings.log_format)
    import structlog

    log: BoundLogger = structlog.get_logger("proxyd")
    log.info(
        "starting",
        listen=settings.listen,
        cache_dir=str(settings.cache_dir),
        namespaces=sorted(runtime.namespaces),
    )
    for source, key in runtime.ignored_keys:
        log.warning("config.unknown_key", file=source, key=key)
    try:
        return asyncio.run(_serve_batched(runtime, log))
    except KeyboardInterrupt:  # before the signal handlers were set: nothing to clean up
        return 130


async def _serve_batched(runtime: RuntimeConfig, log: BoundLogger) -> int:
    """Serve with log lines written in batches (see proxyd.log)."""
    from proxyd.log import OUTPUT

    async with OUTPUT.batched():
        return await _serve(runtime, log)


def freeze_startup_heap() -> None:
    """Collect once, then exempt everything alive now (imports, settings, the app)
    from the garbage collector's later full passes. A full pass over proxyd's heap
    took 20-28 ms here, an event-loop stall in the middle of whatever request set it
    off; with the startup heap frozen it takes under 1 ms. Frozen objects are still
    freed by reference counting. What the collection freed goes back to the kernel."""
    gc.collect()
    gc.freeze()
    heap.release_free()


async def _serve(runtime: RuntimeConfig, log: BoundLogger) -> int:
    """Set up the app, listen (on the sockets systemd passed, else on `listen`), tell
    systemd READY=1, serve until SIGTERM or SIGINT (SIGHUP reads credentials and users
    again: proxyd.reload), then STOPPING=1 and a graceful shutdown: the listener closes
    at once, requests in flight get SHUTDOWN_GRACE seconds to finish (aiohttp waits that
    long twice: for handlers, then for connections), then are cut; downloads they
    started are cancelled and their temporary files removed."""
    settings = runtime.settings
    try:
        inherited = systemd.listen_fds()
    except ValueError as exc:
        log.error("cannot listen", error=str(exc))
        return 1
    tls_context = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            tls_context = tls.server_context(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
        except tls.TLSFileError as exc:
            log.error("cannot serve HTTPS", error=str(exc))
            return 1
    runner = ProxydRunner(
        create_app(runtime, preconnect=True),
        access_log=logging.getLogger("proxyd.access"),
        access_log_class=AccessLogger,
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    try:
        await runner.setup()
    except OSError as exc:
        log.error("cannot start", error=exc.strerror or str(exc), path=exc.filename)
        await runner.cleanup()
        return 1
    try:
        if inherited:
            sites: list[web.BaseSite] = [
                web.SockSite(runner, sock, ssl_context=tls_context) for sock in inherited
            ]
        else:
            host, port = split_listen(settings.listen)
            sites = [web.TCPSite(runner, host, port, ssl_context=tls_context)]
        for site in sites:
            await site.start()
    except OSError as exc:
        log.error("cannot listen", listen=settings.listen, error=exc.strerror or str(exc))
        await runner.cleanup()
        return 1
    addresses = [_address(sock) for sock in inherited] or [settings.listen]
    log.info(
        "listening",
        addresses=addresses,
        socket_activation=bool(inherited),
        tls=tls_context is not None,
    )
    peer_runner = await _listen_for_peers(runner.app, settings, tls_context, log)
    if peer_runner is False:
        await runner.cleanup()
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runner.app[RELOADER].reload_now)
    freeze_startup_heap()
    systemd.notify(f"READY=1\nSTATUS=serving on {', '.join(addresses)}")
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1\nSTATUS=stopping")
        log.info("stopping")
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if peer_runner is not None:
            await peer_runner.cleanup()  # peers first: the core goes with the main app
        await runner.cleanup()
    return 0


async def _listen_for_peers(
    main: web.Application,
    settings: Settings,
    tls_context: ssl.SSLContext | None,
    log: BoundLogger,
) -> web.AppRunner | Literal[False] | None:
    """The listener of `[cluster] listen` (the peer endpoint alone), with the main
    listener's connection bounds (a cap of its own); None without one (peers use the
    main listener, or this node has no fleet), False when it cannot listen."""
    cluster = settings.cluster
    if cluster is None or cluster.listen is None or FLEET not in main:
        return None
    peer_runner = LimitedRunner(
        peers.listener_app(main),
        limits=Limits.of(settings),
        metrics=main[METRICS],
        keepalive_timeout=settings.keepalive_timeout,
        access_log=logging.getLogger("proxyd.access"),
        access_log_class=AccessLogger,
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    await peer_runner.setup()
    host, port = split_listen(cluster.listen)
    try:
        await web.TCPSite(peer_runner, host, port, ssl_context=tls_context).start()
    except OSError as exc:
        log.error("cannot listen for peers", listen=cluster.listen, error=exc.strerror or str(exc))
        await peer_runner.cleanup()
        return False
    log.info("listening for peers", address=cluster.listen, tls=tls_context is not None)
    return peer_runner


def _address(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = f"[{name[0]}]" if ":" in name[0] else name[0]
        return f"{host}:{name[1]}"
    return str(name)
