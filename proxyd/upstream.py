"""One request through a namespace's host chain (containerd's resolver/fetcher loop).

Hosts are tried in order among those with the needed capability; the upstream server,
last, gives the final answer. A mirror's failure moves on to the next host: a
connection error, a timeout, any status above 399 (containerd's rule), a manifest over
max_manifest_size. Some answers are first asked again of the same host, as containerd
asks them (`proxyd.retries`: 408, 429, 5xx and dropped connections of the last host,
HEAD of a manifest refused with 405 asked as GET), within one time budget per request
(`retry_max_wait`), waiting on the core's clock.

What each host did is remembered (`proxyd.breaker`): a circuit breaker per host for
real failures (connections, timeouts, 5xx, a body that broke off or did not match its
digest), counted once a body has been read to its end, not when the headers arrive; a
rate limit per host and kind of request (`GET manifests`, `GET blobs`, ...) for its
Retry-After, so a manifest 429 never stops blob pulls; and a bad answer per host and
path, so the next request for that content goes to the next host.

Each request names its namespace to every host that serves it on another registry's
behalf (`?ns=`, containerd's isProxy), so a chained mirror (another proxyd,
distribution, Harbor, Spegel) resolves in the right registry, and asks each host's
token service for the repository as that host names it (`RegistryHost.scopes`: a
Harbor project's path in front). Each host's exchange
(credentials, a 401 answered once, redirects followed without the registry's
credentials) is `proxyd.exchange`'s.

A request body (`data`, for pushes) given as bytes is replayable and travels like any
request. A streamed body (an async iterable) can be sent once only: it goes to one
host, is never retried, and a failure while sending it does not count against the
host's circuit breaker (the client may have gone away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import hdrs

from proxyd import clienterrors, decrypting, retries
from proxyd.auth import Authorizer
from proxyd.breaker import Breakers
from proxyd.clock import SYSTEM_CLOCK, Clock
from proxyd.config import MAX_MANIFEST_SIZE
from proxyd.errors import (
    ERROR_BODY_LIMIT,
    DigestMismatch,
    ManifestTooLarge,
    NoCapableHost,
    Offline,
    ProxydError,
    TokenError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
    oci_errors,
    said,
)
from proxyd.exchange import (
    MAX_REDIRECTS,
    Body,
    Exchange,
    Refused,
    TLSSetupError,
    is_absolute,
    is_replayable,
    not_refreshed,
)
from proxyd.hostrecord import HostFailure, HostRecord
from proxyd.hosts import Capability, Namespace, RegistryHost, Target
from proxyd.manifests import MANIFEST_TYPES
from proxyd.metrics import Metrics
from proxyd.pace import MinimumRate, TooSlow
from proxyd.proxies import Proxy, route, via
from proxyd.runtime import RuntimeConfig
from proxyd.targets import LinkLocalFilter

log = structlog.get_logger("proxyd.upstream")

# Bytes of a blob body aiohttp buffers before it pauses the socket (twice this): two
# reads from the socket (`SOCKET_READ`), so the socket pauses only while proxyd is
# behind; 1 MiB cost the same CPU and 1.5 MiB more of the peak RSS (docs/performance.md).
BODY_BUFFER = 1 << 19
# The most one read from the socket takes while a body is read (asyncio's: 256 KiB).
SOCKET_READ = 512 << 10
DEFAULT_RETRY_MAX_WAIT = 10.0  # seconds; the retry_max_wait setting's default
# The smallest body taken straight from its socket (`Upstream.raw_body`): such a
# connection is closed after it, not reused, which a small blob would pay for.
SPLICE_FROM = 8 << 20


@dataclass
class RawBody:
    """A body left in its socket for the kernel to move (`proxyd.splicing`), or for a
    worker thread to decrypt where `tls` is its connection's TLS state
    (`proxyd.decrypting`): `head`, what aiohttp had read of it already, then `left`
    bytes in the socket `fd`. The connection is closed once the response is released,
    never reused."""

    fd: int
    head: bytes
    left: int
    timeout: float  # seconds without a byte: the host's read timeout
    pace: MinimumRate
    tls: decrypting.TLSState | None = None


@dataclass
class Upstream:
    """An open response from the host that answered; its body is still unread."""

    host: RegistryHost
    response: aiohttp.ClientResponse
    failures: list[HostFailure]
    min_rate: int = 0  # bytes a second the body must average over each window (pace.py)
    clock: Callable[[], float] = time.monotonic

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a body slower than `min_rate` raises TooSlow (a
        TimeoutError: `request` makes it the host's failure, as a stall).

        The body's buffer is raised to `BODY_BUFFER`: at aiohttp's 64 KiB each read
        from the socket (up to 256 KiB) went over its high-water mark, and the socket
        was paused and resumed around every chunk (two epoll_ctl calls a chunk). The
        most one read from the socket takes is raised too (`_larger_reads`)."""
        self.response.content.set_read_chunk_size(BODY_BUFFER)
        connection = self.response.connection
        transport = connection.transport if connection is not None else None
        return _Paced(self.response.content, MinimumRate(self.min_rate, self.clock), transport)

    def raw_body(self) -> RawBody | None:
        """The body, to be spliced (or decrypted by a worker thread, over TLS), when
        that is possible and worth it: a length of at least `SPLICE_FROM` given by
        Content-Length (no transfer coding to parse), asyncio's own socket transport or
        TLS protocol. aiohttp's reading of the connection is paused for good: what it
        has not read yet is the caller's. None: read `chunks`."""
        response = self.response
        length = response.content_length
        connection = response.connection
        if (
            length is None
            or length < SPLICE_FROM
            or hdrs.TRANSFER_ENCODING in response.headers
            or connection is None
            or connection.transport is None
            or connection.protocol is None
        ):
            return None
        transport = connection.transport
        sock = transport.get_extra_info("socket")
        over_tls = transport.get_extra_info("sslcontext") is not None
        if sock is None or over_tls != hasattr(transport, "_ssl_protocol"):
            return None  # neither asyncio's plain transport nor its TLS one
        content = response.content
        if content.exception() is not None or content.is_eof():
            return None
        tls = decrypting.take(transport) if over_tls else None
        if over_tls and tls is None:
            return None  # an SSL protocol unlike asyncio's: nothing was changed
        head = content.read_nowait()  # (it may resume the reading: paused right after)
        connection.protocol.pause_reading()
        pace = MinimumRate(self.min_rate, self.clock)
        pace.arrived(len(head))
        left = length - len(head)
        return RawBody(sock.fileno(), head, left, self.host.read_timeout, pace, tls)


class _Paced:
    """A response body's chunks, each judged by its pace as it arrives. (An iterator,
    not a generator: a reader may stop early, with nothing left to finalise: the
    connection of a body not read to its end is closed, not reused.)"""

    def __init__(
        self,
        content: aiohttp.StreamReader,
        pace: MinimumRate,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        self._content = content
        self._pace = pace
        self._reader = _larger_reads(transport)

    def __aiter__(self) -> _Paced:
        return self

    async def __anext__(self) -> bytes:
        # One chunk as the socket gave it: `readany` would join every chunk buffered
        # into a new bytes (a copy of each byte). An empty chunk that ends an HTTP
        # chunk is no end of the body.
        while True:
            chunk, chunk_end = await self._content.readchunk()
            if chunk:
                break
            if not chunk_end:
                self._done()
                raise StopAsyncIteration
        self._pace.arrived(len(chunk))
        return chunk

    def _done(self) -> None:
        """The body is read: the connection goes back to the pool with the reads its
        next requests (small answers, mostly) had before."""
        if self._reader is not None:
            _usual_reads(self._reader)
            self._reader = None


def _larger_reads(transport: asyncio.BaseTransport | None) -> Any:
    """What reads `transport`'s socket, made to take up to `SOCKET_READ` a read while a
    body is read; None if it is neither of asyncio's (uvloop's has no such limit).

    asyncio reads at most `max_size` (256 KiB) a `recv`, and every read is one turn
    of the loop through the parser, the body's buffer, the write-behind and the
    clients: a cold 1 GiB blob took 4,100 of them. At 512 KiB the event loop spent 13 %
    less CPU on it, at 1 MiB 21 % less but with a peak RSS 3 MiB higher (the reads in
    flight; docs/performance.md, "Big cold blobs"). A plain connection's reader is its
    socket transport; a TLS connection's is asyncio's SSL protocol under the transport
    aiohttp holds, whose `max_size` sizes both the socket read and the buffer it reads
    into (7 % less of the loop's CPU on a cold 1 GiB blob over HTTPS). The limit is
    an attribute of each class: set on the instance it is this connection's alone, and
    deleting it gives the class's back."""
    if transport is None:
        return None
    reader: Any = getattr(transport, "_ssl_protocol", transport)  # asyncio's, not typed
    if not isinstance(getattr(reader, "max_size", None), int):
        return None
    reader.max_size = SOCKET_READ
    return reader


def _usual_reads(reader: Any) -> None:
    """The class's reads again; an SSL protocol's buffer, grown to `SOCKET_READ` by
    the larger reads, back to its usual size (it lives as long as the connection)."""
    with contextlib.suppress(AttributeError):
        del reader.max_size
        buffer = getattr(reader, "_ssl_buffer", None)
        if isinstance(buffer, bytearray) and len(buffer) > reader.max_size:
            reader._ssl_buffer = fresh = bytearray(reader.max_size)
            reader._ssl_buffer_view = memoryview(fresh)


class UpstreamClient:
    """Owns the one connection pool shared by every upstream request."""

    def __init__(
        self,
        runtime: RuntimeConfig,
        *,
        user_agent: str,
        offline: bool = False,
        breakers: Breakers | None = None,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        retry_max_wait: float = DEFAULT_RETRY_MAX_WAIT,
        max_manifest_size: int = MAX_MANIFEST_SIZE,
    ) -> None:
        self.runtime = runtime
        self.clock = clock  # token lifetimes, retry waits, rate limits
        self.user_agent = user_agent
        self.offline = offline
        self.min_rate = int(runtime.settings.min_transfer_rate)  # of every body (pace.py)
        self.breakers = breakers or Breakers(clock=clock.monotonic)
        self.retry_max_wait = retry_max_wait
        self.max_manifest_size = max_manifest_size  # a mirror's larger manifest moves on
        self.metrics = metrics or Metrics()
        self.record = HostRecord(self.breakers, self.metrics, clock=clock.monotonic)
        self._session: aiohttp.ClientSession | None = None
        self._exchange: Exchange | None = None
        self.on_refused: Refused = not_refreshed  # the reloader's, once the core has one

    async def __aenter__(self) -> UpstreamClient:
        resolver = None
        if not self.runtime.settings.allow_link_local:
            trusted = self.runtime.configured_hostnames()
            resolver = LinkLocalFilter(aiohttp.DefaultResolver(), trusted.__contains__)
        connector = aiohttp.TCPConnector(
            limit=256, limit_per_host=64, ttl_dns_cache=60, resolver=resolver
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        authorizer = Authorizer(
            self._session,
            self.runtime.credential_for,
            user_agent=self.user_agent,
            on_fetch=lambda host: self.metrics.token_fetches.labels(host).inc(),
            clock=self.clock.monotonic,
            allow_link_local=self.runtime.settings.allow_link_local,
            via=lambda host, url: via(self._route(host, url), url),
        )
        self._exchange = Exchange(
            self._session,
            authorizer,
            user_agent=self.user_agent,
            on_refused=lambda host: self.on_refused(host),
            allow_link_local=self.runtime.settings.allow_link_local,
            route=self._route,
        )
        return self

    def _route(self, host: RegistryHost, url: str) -> Proxy | None:
        """The forward proxy of a request made for `host` (to its origin, its token
        server, a redirect target): the host's own, or the environment's for `url`."""
        return route(host.proxy, self.runtime.proxy_env, url)

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def exchange(self) -> Exchange:
        assert self._exchange is not None, "use UpstreamClient as an async context manager"
        return self._exchange

    def ask(
        self,
        target: Target,
        capability: Capability,
        method: str,
        suffix: str,
        *,
        accept: Iterable[str] = (),
        params: dict[str, str] | None = None,
        hosts: list[RegistryHost] | None = None,
    ) -> AbstractAsyncContextManager[Upstream]:
        """A pull's request about `target`'s repository. A manifest asked for with no
        Accept accepts every manifest type proxyd knows (a registry would otherwise
        answer only Docker's schema 2, or refuse). `hosts`: the chain to ask instead of
        the hosts with `capability` (the confirmers of a repository)."""
        accepted = list(accept)
        if not accepted and suffix.startswith("manifests/"):
            accepted = list(MANIFEST_TYPES)
        return self.request(
            target.namespace,
            capability,
            method,
            target.repository,
            suffix,
            headers=[("Accept", value) for value in accepted],
            params=params,
            hosts=hosts,
        )

    @asynccontextmanager
    async def request(
        self,
        namespace: Namespace,
        capability: Capability,
        method: str,
        repository: str,
        suffix: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        params: dict[str, str] | None = None,
        actions: str = "pull",
        scopes: Iterable[str] = (),
        data: Body = None,
        hosts: list[RegistryHost] | None = None,
    ) -> AsyncIterator[Upstream]:
        """Yield the first acceptable response of the chain; raise when none is.

        `scopes` are token scopes needed besides the repository's (a cross-repository
        mount reads another repository); `data` is the request body; `hosts`, when
        given, the chain instead of the namespace's hosts with `capability`."""
        if self.offline:
            raise Offline(f"offline: {method} {repository}/{suffix} needs {namespace.name}")
        hosts = namespace.hosts_for(capability) if hosts is None else hosts
        if not hosts:
            raise NoCapableHost(
                f"namespace {namespace.name!r} has no host with the "
                f"{capability.name and capability.name.lower()} capability"
            )
        # No repository: a registry-wide call (the catalog).
        scope = f"repository:{repository}:{actions}" if repository else "registry:catalog:*"
        scope = " ".join([scope, *scopes])
        # An absolute suffix is a URL of its own (an upload moved to object storage).
        path = f"{repository}/{suffix}" if repository and not is_absolute(suffix) else suffix
        replayable = is_replayable(data)
        if not replayable:
            hosts = hosts[:1]  # a stream is sent once: to one host
        kind = f"{method} {_area(suffix)}"
        deadline = self.clock.monotonic() + self.retry_max_wait
        failures: list[HostFailure] = []
        for index, host in enumerate(hosts):
            last = index == len(hosts) - 1
            skipped = self.record.skipped(host, kind, path, last=last)
            if skipped is not None:
                failures.append(skipped)
                continue
            with_ns = _with_ns(params, namespace, host)
            ask = retries.Ask(
                host, method, suffix, path, headers, with_ns, host.scopes(scope), data
            )
            started = time.perf_counter()
            try:
                response = await retries.send(
                    self.exchange, ask, last=last, deadline=deadline, clock=self.clock
                )
            except (aiohttp.ClientError, TimeoutError, TokenError) as exc:
                self.record.failed(failures, HostFailure(host, _describe(exc)), trip=replayable)
                continue
            except Unauthorized as exc:
                if not host.is_mirror:
                    raise
                self.record.failed(failures, HostFailure(host, exc.message, 401), trip=False)
                continue
            self.record.observe(host, response, time.perf_counter() - started)
            moved_on = self._moves_on(host, suffix, response)
            if moved_on is not None:
                if moved_on.status == 429:
                    await _with_what_it_said(moved_on, response)
                    limited = f"{response.method} {_area(suffix)}"  # GET, after a HEAD's 405
                    self.record.rate_limited(host, limited, moved_on, response)
                response.release()
                self.record.failed(failures, moved_on, trip=(moved_on.status or 0) >= 500)
                continue
            try:
                yield Upstream(host, response, failures, self.min_rate, self.clock.monotonic)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                # The body broke or stalled after the headers: still this host's failure
                # (ConnectionError: a spliced body's, which aiohttp never saw).
                reason = _describe(exc)
                self.record.bad_answer(host, path, failures, reason)
                raise UpstreamError(
                    f"{host.origin}: the answer to {method} {path} broke off: {reason}"
                ) from exc
            except DigestMismatch as exc:
                self.record.bad_answer(host, path, failures, exc.message)
                raise
            except ManifestTooLarge as exc:
                if host.is_mirror:  # the next request goes to the next host
                    self.record.bad_answer(host, path, failures, exc.message, trip=False)
                raise
            except Exception:
                self.record.answered(host, path)  # the host answered; the caller refused it
                raise
            finally:
                response.release()
            self.record.answered(host, path)
            return
        raise _chain_error(namespace, failures)

    def _moves_on(
        self, host: RegistryHost, suffix: str, response: aiohttp.ClientResponse
    ) -> HostFailure | None:
        """Why this answer sends the request on to the next host, if it does."""
        status = response.status
        if status >= 500 or status in (408, 429) or (host.is_mirror and status > 399):
            return HostFailure(
                host, f"answered {status}", status, response.headers.get("Retry-After")
            )
        length = response.content_length
        if (
            host.is_mirror
            and status < 300
            and response.method in ("GET", "HEAD")
            and suffix.startswith("manifests/")
            and length is not None
            and length > self.max_manifest_size
        ):
            return HostFailure(
                host, f"sent a {length}-byte manifest; the limit is {self.max_manifest_size}"
            )
        return None


async def _with_what_it_said(failure: HostFailure, response: aiohttp.ClientResponse) -> None:
    """The registry's own words on a refusal that moves on (Docker Hub's "You have
    reached your pull rate limit…"), added to the reason the client is told."""
    if response.method == "HEAD":
        return
    try:
        words = said(oci_errors(await response.content.read(ERROR_BODY_LIMIT)))
    except (aiohttp.ClientError, TimeoutError):
        return
    if words:
        failure.reason = f"{failure.reason}: {words}"


async def read_body(up: Upstream, limit: int) -> bytes:
    """Up to `limit` bytes of a small body. A body that breaks, stalls or drips is the
    host's failure: `request` turns it into UpstreamError (502, or a stale answer)."""
    body = bytearray()
    async for chunk in up.chunks():
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


def _area(suffix: str) -> str:
    """The kind of request a registry may limit apart: manifests, blobs, tags, ..."""
    return suffix.split("/", 1)[0] or "base"


def _with_ns(
    params: dict[str, str] | None, namespace: Namespace, host: RegistryHost
) -> dict[str, str] | None:
    """`ns=` for a host that serves the namespace on another registry's behalf."""
    if not host.is_proxy(namespace.name):
        return params
    return {**(params or {}), "ns": namespace.name}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TooSlow):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return f"more than {MAX_REDIRECTS} redirects"
    if isinstance(exc, ProxydError):
        return exc.message
    if isinstance(exc, TLSSetupError):
        return str(exc)
    return clienterrors.describe(exc)  # in words: aiohttp's own messages hold reprs


def _chain_error(namespace: Namespace, failures: list[HostFailure]) -> ProxydError:
    """The client gets the last host's reason; 429 keeps its Retry-After."""
    summary = "; ".join(f"{f.host.origin}: {f.reason}" for f in failures)
    last = failures[-1]
    if last.status == 429:
        headers = {"Retry-After": last.retry_after} if last.retry_after else {}
        return TooManyRequests(
            f"every host of {namespace.name!r} is rate limiting: {summary}", headers=headers
        )
    return UpstreamError(f"no host of {namespace.name!r} could answer: {summary}")
