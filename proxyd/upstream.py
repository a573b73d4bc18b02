"""One request through a namespace's host chain (containerd's resolver/fetcher loop).

Hosts are tried in order among those with the needed capability. Connection errors,
timeouts, 5xx, 429, and a mirror's 404/401/403 move on to the next host; the
upstream server's answer is final. A 401 goes to the authorizer and the request is
sent once more with fresh credentials. Redirects are followed by hand so the
registry's Authorization (and client certificate) never reach another origin.

A request body (`data`, for pushes) given as bytes is replayable and travels like any
request. A streamed body (an async iterable) can be sent once only: it goes to one
host, after the host's challenge is known (a `GET /v2/` first, as clients ping), is
never resent after a 401 or a redirect, and a failure while sending it does not
count against the host's circuit breaker (the client may have gone away).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

from proxyd import clienterrors, tls
from proxyd.auth import Authorizer
from proxyd.breaker import Breakers, parse_retry_after
from proxyd.config import Registry
from proxyd.errors import (
    NoCapableHost,
    Offline,
    ProxydError,
    TokenError,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
)
from proxyd.hosts import Capability, Namespace, RegistryHost
from proxyd.metrics import Metrics

log = structlog.get_logger("proxyd.upstream")

MAX_REDIRECTS = 5
RATELIMIT_WARN_FRACTION = 0.1  # warn when a host's announced pulls left fall below this
_REDIRECTS = (301, 302, 303, 307, 308)

Body = bytes | AsyncIterable[bytes] | None


@dataclass
class HostFailure:
    host: RegistryHost
    reason: str
    status: int | None = None
    retry_after: str | None = None


@dataclass
class Upstream:
    """An open response from the host that answered; its body is still unread."""

    host: RegistryHost
    response: aiohttp.ClientResponse
    failures: list[HostFailure]


async def registry_errors(up: Upstream, what: str) -> tuple[list[dict[str, Any]], str]:
    """The `errors` of a registry's OCI error body (if it sent one) and the message a
    client is told: the host, what was asked, and what the registry said of it."""
    errors: list[dict[str, Any]] = []
    if up.response.method != "HEAD":
        try:
            data = json.loads(await up.response.content.read(64 * 1024))
        except (ValueError, aiohttp.ClientError):
            data = None
        found = data.get("errors") if isinstance(data, dict) else None
        if isinstance(found, list):
            errors = [e for e in found if isinstance(e, dict)]
    said = "; ".join(str(e.get("message") or e.get("code")) for e in errors)
    return errors, f"{up.host.host}: {what}: {said or up.response.status}"


class UpstreamClient:
    """Owns the one connection pool shared by every upstream request."""

    def __init__(
        self,
        registry: Registry,
        *,
        user_agent: str,
        offline: bool = False,
        breakers: Breakers | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.registry = registry
        self.user_agent = user_agent
        self.offline = offline
        self.breakers = breakers or Breakers()
        self.metrics = metrics or Metrics()
        self._session: aiohttp.ClientSession | None = None
        self._authorizer: Authorizer | None = None
        self._ssl: dict[tuple[RegistryHost, bool], Any] = {}
        self._pinged: set[RegistryHost] = set()  # hosts asked GET /v2/ before a streamed body
        self.on_refused: Callable[[str], Awaitable[bool]] = _not_refreshed

    async def __aenter__(self) -> UpstreamClient:
        connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, ttl_dns_cache=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        self._authorizer = Authorizer(
            self._session,
            self.registry.credential_for,
            user_agent=self.user_agent,
            on_fetch=lambda host: self.metrics.token_fetches.labels(host).inc(),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def authorizer(self) -> Authorizer:
        assert self._authorizer is not None, "use UpstreamClient as an async context manager"
        return self._authorizer

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use UpstreamClient as an async context manager"
        return self._session

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
    ) -> AsyncIterator[Upstream]:
        """Yield the first acceptable response of the chain; raise when none is.

        `scopes` are token scopes needed besides the repository's (a cross-repository
        mount reads another repository); `data` is the request body."""
        if self.offline:
            raise Offline(f"offline: {method} {repository}/{suffix} needs {namespace.name}")
        hosts = namespace.hosts_for(capability)
        if not hosts:
            raise NoCapableHost(
                f"namespace {namespace.name!r} has no host with the "
                f"{capability.name and capability.name.lower()} capability"
            )
        # No repository: a registry-wide call (the catalog).
        scope = f"repository:{repository}:{actions}" if repository else "registry:catalog:*"
        scope = " ".join([scope, *scopes])
        path = f"{repository}/{suffix}" if repository else suffix
        replayable = _replayable(data)
        if not replayable:
            hosts = hosts[:1]  # a stream is sent once: to one host
        failures: list[HostFailure] = []
        for host in hosts:
            if not self.breakers.allow(host.host):
                failures.append(HostFailure(host, "skipped: circuit open after failures"))
                continue
            started = time.perf_counter()
            try:
                send = partial(self._send, host, method, path, headers, params, scope, data)
                response = await self._once_more_if_refreshed(host, send, replayable)
            except (aiohttp.ClientError, TimeoutError, TokenError) as exc:
                self._failed(failures, HostFailure(host, _describe(exc)), trip=replayable)
                continue
            except Unauthorized as exc:
                if not host.is_mirror:
                    raise
                self._failed(failures, HostFailure(host, exc.message, 401), trip=False)
                continue
            self._observe(host, response, time.perf_counter() - started)
            if _moves_on(host, response.status):
                failure = HostFailure(
                    host,
                    f"answered {response.status}",
                    response.status,
                    response.headers.get("Retry-After"),
                )
                response.release()
                self._failed(
                    failures, failure, trip=response.status >= 500 or response.status == 429
                )
                continue
            self.breakers.succeeded(host.host)
            self.metrics.circuit_open.labels(host.host).set(0)
            try:
                yield Upstream(host, response, failures)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The body broke or stalled after the headers: still this host's failure.
                self._failed(failures, HostFailure(host, _describe(exc)), trip=True)
                raise UpstreamError(
                    f"{host.origin}: the answer to {method} {path} broke off: {_describe(exc)}"
                ) from exc
            finally:
                response.release()
            return
        raise _chain_error(namespace, failures)

    def _failed(self, failures: list[HostFailure], failure: HostFailure, *, trip: bool) -> None:
        """Record a host's failure; `trip` counts it towards the host's circuit breaker."""
        failures.append(failure)
        host = failure.host.host
        if trip:
            wait = parse_retry_after(failure.retry_after) if failure.status == 429 else None
            self.breakers.failed(host, wait)
            self.metrics.circuit_open.labels(host).set(int(self.breakers.is_open(host)))
        reason = str(failure.status) if failure.status else _reason_class(failure.reason)
        self.metrics.upstream_errors.labels(host, reason).inc()
        log.info("upstream.failed", host=host, reason=failure.reason)

    def _observe(
        self, host: RegistryHost, response: aiohttp.ClientResponse, seconds: float
    ) -> None:
        """Latency, and Docker Hub's rate-limit headers (`100;w=21600`)."""
        self.metrics.upstream_seconds.labels(host.host, f"{response.status // 100}xx").observe(
            seconds
        )
        limit = _leading_number(response.headers.get("RateLimit-Limit"))
        remaining = _leading_number(response.headers.get("RateLimit-Remaining"))
        if limit is not None:
            self.metrics.ratelimit_limit.labels(host.host).set(limit)
        if remaining is not None:
            self.metrics.ratelimit_remaining.labels(host.host).set(remaining)
            if limit and remaining < limit * RATELIMIT_WARN_FRACTION:
                log.warning(
                    "upstream.ratelimit_low", host=host.host, remaining=remaining, limit=limit
                )

    async def _once_more_if_refreshed(
        self,
        host: RegistryHost,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
        replayable: bool,
    ) -> aiohttp.ClientResponse:
        """`send()`; when the host refuses (or asks for) credentials, proxyd's may be out
        of date (a rotated secret): once read again and changed, it goes once more (a
        body that can be sent once only does not)."""
        try:
            return await send()
        except Unauthorized:
            if not await self.on_refused(host.host) or not replayable:
                raise
        return await send()

    async def _send(
        self,
        host: RegistryHost,
        method: str,
        path: str,
        extra: Iterable[tuple[str, str]],
        params: dict[str, str] | None,
        scope: str,
        data: Body = None,
    ) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=host.connect_timeout, sock_read=host.read_timeout
        )
        base: CIMultiDict[str] = CIMultiDict([("User-Agent", self.user_agent)])
        for name, value in (*host.headers, *extra):
            base.add(name, value)
        replayable = _replayable(data)
        own_tls = self._ssl_for(host, same_origin=True)
        if not replayable and await self.authorizer.authorization(host, scope, own_tls) is None:
            await self._ping(host, timeout)
        for attempt in (1, 2):
            authorization = await self.authorizer.authorization(host, scope, own_tls)
            url = host.url(path)
            for _hop in range(MAX_REDIRECTS + 1):
                same_origin = _origin(url) == host.origin
                headers = CIMultiDict(base)
                if authorization and same_origin:
                    headers["Authorization"] = authorization
                response = await self.session.request(
                    method,
                    url,
                    headers=headers,
                    params=params if url == host.url(path) else None,
                    data=data,
                    allow_redirects=False,
                    timeout=timeout,
                    ssl=self._ssl_for(host, same_origin),
                )
                if response.status in _REDIRECTS and "Location" in response.headers and replayable:
                    response.release()
                    url = _redirect_target(url, response.headers["Location"])
                    continue
                break
            else:
                response.release()
                raise aiohttp.TooManyRedirects(response.request_info, response.history)
            if response.status != 401 or not same_origin:
                return response
            challenge = response.headers.getall("WWW-Authenticate", [])
            response.release()
            learned = attempt == 1 and self.authorizer.learn(host, challenge)
            if not learned or not replayable:
                self.authorizer.forget(host, scope)
                if learned:
                    raise Unauthorized(
                        f"{host.host} asked for credentials for {scope} once the body was "
                        "sent; proxyd has learnt its challenge: send the request again"
                    )
                raise Unauthorized(
                    f"{host.host} refused proxyd's credentials for {scope}"
                    if authorization
                    else f"{host.host} requires credentials for {scope} and proxyd has none"
                )
        raise AssertionError("unreachable")

    async def _ping(self, host: RegistryHost, limits: aiohttp.ClientTimeout) -> None:
        """Before a body that cannot be sent twice, with no credentials for it yet:
        learn the host's challenge from `GET /v2/` (once per host)."""
        if host in self._pinged:
            return
        async with self.session.get(
            host.url(""),
            headers=[("User-Agent", self.user_agent), *host.headers],
            allow_redirects=False,
            timeout=limits,
            ssl=self._ssl_for(host, same_origin=True),
        ) as ping:
            if ping.status == 401:
                self.authorizer.learn(host, ping.headers.getall("WWW-Authenticate", []))
        self._pinged.add(host)

    def _ssl_for(self, host: RegistryHost, same_origin: bool) -> Any:
        """TLS settings of the host: its CAs apply to redirects too, its client
        certificate only to the host itself."""
        if host.scheme != "https":
            return True
        key = (host, same_origin)
        if key not in self._ssl:
            try:
                self._ssl[key] = tls.upstream_context(host, same_origin=same_origin)
            except tls.TLSFileError as exc:  # a host failure, said plainly: not a crash
                raise TLSSetupError(f"TLS settings of {host.origin}: {exc}") from None
        return self._ssl[key]


class TLSSetupError(aiohttp.ClientError):
    """A host's `ca` or `client` files cannot be used (read when first needed)."""


def _redirect_target(url: str, location: str) -> str:
    """Only http(s) redirects are followed; a malformed one fails this host."""
    try:
        target = urljoin(url, location)
        scheme = urlsplit(target).scheme
    except ValueError:
        raise aiohttp.InvalidURL(location) from None
    if scheme not in ("http", "https"):
        raise aiohttp.InvalidURL(location)
    return target


async def _not_refreshed(host: str) -> bool:
    """An UpstreamClient without a reloader (used alone, as in tests): credentials
    never change."""
    return False


def _replayable(data: Body) -> bool:
    return data is None or isinstance(data, bytes)


def _leading_number(value: str | None) -> float | None:
    if not value:
        return None
    head = value.split(";", 1)[0].strip()
    try:
        return float(head)
    except ValueError:
        return None


def _reason_class(reason: str) -> str:
    if reason == "timed out":
        return "timeout"
    if "circuit open" in reason:
        return "circuit_open"
    if "token" in reason:
        return "token"
    return "connection"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _moves_on(host: RegistryHost, status: int) -> bool:
    """Whether this answer sends the request on to the next host of the chain."""
    if status >= 500 or status == 429:
        return True
    return host.is_mirror and status in (401, 403, 404)


def _describe(exc: BaseException) -> str:
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
