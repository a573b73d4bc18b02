"""At start, each configured upstream host asked `GET /v2/` in the background, as
containerd's resolver and every engine begin: the first pull after a start then finds
the host's connection open, its name resolved, its TLS context built and its challenge
known, as a proxyd that has served does. Without it a token upstream's first request
went out bare, was refused 401, and only then was a token fetched for it; now the
token is fetched first and the request goes once.

What this sends is cheap and bounded: one `GET /v2/` per host (no credentials, the
answer's small body read so the connection stays in the pool), every host at once,
each within PRECONNECT_TIMEOUT. Nothing waits for it: not readiness (an upstream that
is down must not hold the start), not a request (one that comes first asks on its
own, as before). Each outcome is logged; a host that does not answer is left for
requests to find: its circuit breaker counts no failure, which is no client's.
`preconnect = false`, or `offline`, sends nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import aiohttp
import structlog

from proxyd import clienterrors
from proxyd.hosts import Capability, Namespace, RegistryHost
from proxyd.runtime import BUILT_IN, RuntimeConfig
from proxyd.upstream import UpstreamClient

log = structlog.get_logger("proxyd.preconnect")

PRECONNECT_TIMEOUT = 10.0  # seconds one host's GET /v2/ may take, connection included
MAX_HOSTS = 64  # hosts asked at start; namespaces are the user's, but bounded anyway
_SERVES_PULLS = Capability.PULL | Capability.RESOLVE


def namespaces_to_warm(runtime: RuntimeConfig) -> list[Namespace]:
    """The namespaces a pull is expected through: each one configured (the TOML file,
    hosts_dir) and the default one. Not Docker Hub's built-in namespace when another
    is the default: a proxyd for a private registry would reach out to Docker Hub at
    every start (a warning each time where a firewall stops it)."""
    default = runtime.namespaces.get(runtime.settings.default_namespace)
    return [ns for ns in runtime.namespaces.values() if ns.source != BUILT_IN or ns is default]


def hosts_to_ask(namespaces: Iterable[Namespace]) -> list[RegistryHost]:
    """Each host that serves pulls in `namespaces`, once, in order."""
    hosts: dict[RegistryHost, None] = {}
    for namespace in namespaces:
        for host in namespace.hosts:
            if host.capabilities & _SERVES_PULLS:
                hosts.setdefault(host)
    return list(hosts)[:MAX_HOSTS]


async def preconnect(upstream: UpstreamClient, hosts: list[RegistryHost]) -> None:
    """Ask every host at once; return when each has answered or failed."""
    await asyncio.gather(*(_ask(upstream, host) for host in hosts))


async def _ask(upstream: UpstreamClient, host: RegistryHost) -> None:
    limits = aiohttp.ClientTimeout(total=PRECONNECT_TIMEOUT, sock_connect=host.connect_timeout)
    started = time.perf_counter()
    try:
        status = await upstream.exchange.ping(host, limits)
    except Exception as exc:  # whatever it was, a warm-up's failure is only logged
        log.warning("preconnect.failed", host=host.origin, error=clienterrors.describe(exc))
        return
    challenge = upstream.exchange.authorizer.challenge_of(host)
    log.info(
        "preconnect",
        host=host.origin,
        status=status,
        challenge=challenge,
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
    )


def start(upstream: UpstreamClient, runtime: RuntimeConfig) -> asyncio.Task[None] | None:
    """The background task asking the hosts (None when proxyd is offline: nothing
    goes upstream); the core cancels it on its way out (`background.stop_loop`)."""
    if upstream.offline:
        return None
    hosts = hosts_to_ask(namespaces_to_warm(runtime))
    if not hosts:
        return None
    return asyncio.create_task(preconnect(upstream, hosts), name="preconnect")
