"""One request to one host of a chain: proxyd's credentials for it, redirects
followed by hand, the host's TLS settings and its forward proxy.

The authorizer supplies the Authorization for the host and the scope; a 401 is
answered once (the challenge learnt, a refused token dropped, a token asked for the
scopes the challenge names), and a second is the host refusing them. Redirects (blob
storage, CDNs) are followed here rather than by aiohttp, so the registry's
Authorization, the host's configured headers and its client certificate never reach
another origin; a request may also name a URL on another origin itself (an upload the
registry moved to object storage), and goes there the same way, bare. Either goes
only where proxyd.targets allows (http or https, no link-local address). When the host
refuses credentials (a 401, or a 403 to credentials proxyd sent, as ECR refuses an
expired password), proxyd's may be out of date (a rotated secret): `on_refused` reads
them again, and a request they changed goes once more. Every hop goes through the
proxy `route` names for it.

A request body given as bytes is replayable. A streamed body can be sent once only:
it is sent after the host's challenge is known (a `GET /v2/` first, as clients
ping), and never again after a 401 or a redirect.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from functools import partial
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from proxyd import targets, tls
from proxyd.auth import Authorizer, challenge_scopes
from proxyd.errors import Unauthorized
from proxyd.hosts import RegistryHost
from proxyd.proxies import Proxy, Via, via

MAX_REDIRECTS = targets.MAX_REDIRECTS
PING_BODY_LIMIT = 64 * 1024  # bytes of a `GET /v2/` answer read to keep its connection
_REDIRECTS = (301, 302, 303, 307, 308)

Body = bytes | AsyncIterable[bytes] | None
Refused = Callable[[str], Awaitable[bool]]  # the host refused: did its credentials change?
Route = Callable[[RegistryHost, str], Proxy | None]  # a request for the host, to a URL: which proxy


class Exchange:
    """Sends requests to registry hosts over the one session, with the authorizer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        authorizer: Authorizer,
        *,
        user_agent: str,
        on_refused: Refused,
        allow_link_local: bool = False,
        route: Route = lambda host, url: None,
    ) -> None:
        self.session = session
        self.authorizer = authorizer
        self.user_agent = user_agent
        self._on_refused = on_refused
        self._allow_link_local = allow_link_local  # redirects there (proxyd.targets)
        self._route = route
        self._ssl: dict[tuple[object, ...], Any] = {}
        self._pinged: set[RegistryHost] = set()  # hosts asked GET /v2/ before a streamed body

    async def send(
        self,
        host: RegistryHost,
        method: str,
        path: str,
        extra: Iterable[tuple[str, str]],
        params: dict[str, str] | None,
        scope: str,
        data: Body = None,
    ) -> aiohttp.ClientResponse:
        """The host's answer (its body unread); Unauthorized when it refuses proxyd's
        credentials for `scope`, or has none to give. `path` is below the host's API
        root, or an absolute URL (then, on another origin, sent without credentials)."""
        send = partial(self._send, host, method, path, extra, params, scope, data)
        return await self._once_more_if_refreshed(host, send, is_replayable(data))

    async def _once_more_if_refreshed(
        self,
        host: RegistryHost,
        send: Callable[[], Awaitable[aiohttp.ClientResponse]],
        replayable: bool,
    ) -> aiohttp.ClientResponse:
        """`send()`; when the host refuses (or asks for) credentials, proxyd's may be out
        of date (a rotated secret): once read again and changed, it goes once more (a
        body that can be sent once only does not). A 403 to credentials proxyd sent
        counts as a refusal too: ECR answers its expired 12-hour passwords so, `DENIED`
        without a challenge, where a 401 would ask for new ones."""
        try:
            response = await send()
        except Unauthorized:
            if not await self._on_refused(host.host) or not replayable:
                raise
            return await send()
        refused = response.status == 403 and replayable and _sent_credentials(response, host)
        if refused and await self._on_refused(host.host):
            response.release()
            return await send()
        return response

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
        extra = tuple(extra)
        base: CIMultiDict[str] = CIMultiDict([("User-Agent", self.user_agent)])
        for name, value in (*host.headers, *extra):
            base.add(name, value)
        # Another origin sees neither the host's configured headers nor its credentials
        # (Go's client keeps configured headers across redirects, dropping Authorization).
        bare: CIMultiDict[str] = CIMultiDict([("User-Agent", self.user_agent), *extra])
        first = path if is_absolute(path) else host.url(path)
        foreign = _origin(first) != host.origin  # nothing of the host's goes there
        if foreign:  # a URL the registry named (an upload's Location)
            targets.check(first, allow_link_local=self._allow_link_local)
        replayable = is_replayable(data)
        own_tls = self._ssl_for(host, same_origin=True)
        if (
            not foreign
            and not replayable
            and await self.authorizer.authorization(host, scope, own_tls) is None
        ):
            await self._ping(host, timeout)
        wanted: tuple[str, ...] = ()  # the scopes a 401 named, for the retry
        for attempt in (1, 2):
            authorization = (
                None
                if foreign
                else await self.authorizer.authorization(host, scope, own_tls, also=wanted)
            )
            url = first
            for _hop in range(MAX_REDIRECTS + 1):
                same_origin = _origin(url) == host.origin
                headers = CIMultiDict(base if same_origin else bare)
                if authorization and same_origin:
                    headers["Authorization"] = authorization
                proxied = self._via(host, url)
                headers.update(proxied.headers)
                response = await self.session.request(
                    method,
                    url,
                    headers=headers,
                    params=params if url == first else None,
                    data=data,
                    allow_redirects=False,
                    timeout=timeout,
                    ssl=self._ssl_for(host, same_origin),
                    **proxied.arguments,
                )
                if response.status == 407 and proxied.arguments:
                    # The proxy's refusal, not the host's answer: a failure, as aiohttp
                    # makes a tunnel's.
                    response.release()
                    raise aiohttp.ClientHttpProxyError(
                        response.request_info,
                        response.history,
                        status=407,
                        message=response.reason or "Proxy Authentication Required",
                    )
                if response.status in _REDIRECTS and "Location" in response.headers and replayable:
                    response.release()
                    url = _redirect_target(url, response.headers["Location"])
                    targets.check(url, allow_link_local=self._allow_link_local)
                    continue
                break
            else:
                response.release()
                raise aiohttp.TooManyRedirects(response.request_info, response.history)
            if response.status != 401 or not same_origin:
                return response
            challenge = response.headers.getall("WWW-Authenticate", [])
            response.release()
            refused = bool(authorization)  # never sent again: containerd's AddResponses
            learned = self.authorizer.learn(host, challenge, refused=refused) and attempt == 1
            if not learned or not replayable:
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
            wanted = challenge_scopes(challenge)
        raise AssertionError("unreachable")

    async def _ping(self, host: RegistryHost, limits: aiohttp.ClientTimeout) -> None:
        """Before a body that cannot be sent twice, with no credentials for it yet:
        learn the host's challenge from `GET /v2/` (once per host)."""
        if host not in self._pinged:
            await self.ping(host, limits)

    async def ping(self, host: RegistryHost, limits: aiohttp.ClientTimeout) -> int:
        """`GET /v2/`, as clients begin: the host's status; its challenge learnt from a
        401, and its (small) body read, so the connection stays in the pool for the
        next request. No credentials are sent."""
        proxied = self._via(host, host.origin)
        async with self.session.get(
            host.url(""),
            headers=[("User-Agent", self.user_agent), *host.headers, *proxied.headers.items()],
            allow_redirects=False,
            timeout=limits,
            ssl=self._ssl_for(host, same_origin=True),
            **proxied.arguments,
        ) as ping:
            if ping.status == 401:
                self.authorizer.learn(host, ping.headers.getall("WWW-Authenticate", []))
            left = PING_BODY_LIMIT  # a longer body closes the connection instead
            while left > 0 and (chunk := await ping.content.read(left)):
                left -= len(chunk)
        self._pinged.add(host)
        return ping.status

    def _via(self, host: RegistryHost, url: str) -> Via:
        """The way through the proxy a request for `host` to `url` takes (none: direct)."""
        return via(self._route(host, url), url)

    def _ssl_for(self, host: RegistryHost, same_origin: bool) -> Any:
        """TLS settings of the host: its CAs apply to redirects too, its client
        certificate only to the host itself."""
        if host.scheme != "https" or not tls.has_own_context(host, same_origin=same_origin):
            return True  # aiohttp's verified context: every registry a client may name
        # Keyed by what the context is made of, not by the host.
        key = (host.ca, host.client if same_origin else (), host.skip_verify)
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


async def not_refreshed(host: str) -> bool:
    """An UpstreamClient without a reloader (used alone, as in tests): credentials
    never change."""
    return False


def is_absolute(url: str) -> bool:
    """An http(s) URL of its own, not a path below a host's API root."""
    return urlsplit(url).scheme in ("http", "https")


def _sent_credentials(response: aiohttp.ClientResponse, host: RegistryHost) -> bool:
    """Whether this answer is the host's own, to a request carrying proxyd's credentials
    (not a redirect target's, which never sees them)."""
    asked = response.request_info
    return _origin(str(asked.real_url)) == host.origin and "Authorization" in asked.headers


def is_replayable(data: Body) -> bool:
    return data is None or isinstance(data, bytes)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
