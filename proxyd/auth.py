"""The central authorizer: answers upstream 401 challenges so clients never hold
upstream secrets (containerd's `NewDockerAuthorizer`).

It learns each host's challenge from a 401 (`AddResponses`), fetches and caches
bearer tokens per (host, realm, service, scopes) until they expire (a bounded LRU),
and from then on authorizes requests to that host before sending them. Credentials
are looked up by the exact host they belong to; nothing here ever attaches them
elsewhere, and the host's configured headers go to its token realm only when that is
on the host's own origin (containerd's `WithAuthHeader` sends them to any realm).

A token is asked for the scopes of the request at hand (its repository's, plus a
mount source's pull), as the token spec says: a `GET` repeats `scope` once per scope
(distribution docs/spec/auth/token.md), an OAuth2 `POST` sends one `scope` holding
the space-separated list (oauth.md), as containerd's auth/fetch.go does. A 401 that
refuses a token proxyd sent, or says why (`error="invalid_token"`), drops the host's
cached tokens, as containerd's `AddResponses` drops the host's handler: the retry
fetches a new one instead of sending the refused one again.

The realm may be on another host (Docker Hub's is auth.docker.io), as containerd
allows, but only where proxyd.targets allows (http or https, no link-local address),
and the token server's redirects are followed within the realm's own origin only:
the credentials in a token request are never carried to another one (a 307 would
post the password again, as aiohttp's and Go's clients do).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import structlog
from multidict import CIMultiDict

from proxyd import clienterrors, targets
from proxyd.credentials import Credential
from proxyd.errors import TokenError, Unauthorized
from proxyd.hosts import RegistryHost
from proxyd.proxies import DIRECT, Via
from proxyd.singleflight import SingleFlight

log = structlog.get_logger("proxyd.auth")

DEFAULT_TOKEN_LIFETIME = 60  # seconds, when the token server gives no expires_in
MAX_TOKEN_LIFETIME = 86400  # seconds: however long a token server says a token lasts
MAX_CACHED_TOKENS = 1024  # one per (host, realm, service, scopes) in use: an LRU beyond
CLIENT_ID = "proxyd"
_TOKEN_FALLBACK_STATUSES = (400, 401, 404, 405)  # POST unsupported: try GET (as containerd)
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict, hash=False)


_RFC7230_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_CHALLENGE_PART = re.compile(
    rf"""\s*(?:
        (?P<key>{_RFC7230_TCHAR})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<bare>[^\s,]*))
      | (?P<scheme>{_RFC7230_TCHAR}=*)
    )\s*,?""",
    re.VERBOSE,
)

_EMPTY_ELEMENTS = re.compile(r"[\s,]*")  # RFC 7230 section 7: empty list elements are legal


def parse_www_authenticate(values: list[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` header values (RFC 7235) into challenges. Unparseable
    text is skipped rather than raised: a registry's odd header must not crash us."""
    challenges: list[Challenge] = []
    for value in values:
        pos = 0
        current: Challenge | None = None
        while pos < len(value):
            pos = _EMPTY_ELEMENTS.match(value, pos).end()  # type: ignore[union-attr]
            if pos >= len(value):
                break
            match = _CHALLENGE_PART.match(value, pos)
            if not match or match.end() == pos:
                break
            pos = match.end()
            if match["scheme"]:
                current = Challenge(match["scheme"].lower())
                challenges.append(current)
            elif current is not None and match["key"]:
                raw = match["quoted"]
                text = re.sub(r"\\(.)", r"\1", raw) if raw is not None else match["bare"]
                current.params[match["key"].lower()] = text
    return challenges


def challenge_scopes(www_authenticate: list[str]) -> tuple[str, ...]:
    """The scopes a bearer challenge names (`scope` is a space-separated list): what the
    host says the request it refused needs, which a retry of that request asks for
    besides its own."""
    for challenge in parse_www_authenticate(www_authenticate):
        if challenge.scheme == "bearer" and "realm" in challenge.params:
            return tuple(challenge.params.get("scope", "").split())
    return ()


def scope_list(*scopes: Iterable[str]) -> tuple[str, ...]:
    """Scopes sorted, each once (containerd's GetTokenScopes): the same set is the same
    token request and the same cache entry, however it was put together."""
    return tuple(sorted({scope for group in scopes for scope in group if scope}))


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass
class _Token:
    value: str
    expires_at: float


class _TokenCache:
    """Tokens by (host, realm, service, scopes), at most `limit` of them: the least
    recently used goes first, and an expired one before any that still works. Scopes
    come from client requests (every repository asked for), so without a bound the
    cache would grow with them."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        self._limit = limit
        self._clock = clock
        self._tokens: OrderedDict[tuple[str, ...], _Token] = OrderedDict()

    def get(self, key: tuple[str, ...]) -> _Token | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if token.expires_at <= self._clock():
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token

    def put(self, key: tuple[str, ...], token: _Token) -> None:
        self._tokens[key] = token
        self._tokens.move_to_end(key)
        if len(self._tokens) > self._limit:
            now = self._clock()
            for stale in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[stale]
        while len(self._tokens) > self._limit:
            self._tokens.popitem(last=False)

    def drop_host(self, host: str) -> None:
        for key in [k for k in self._tokens if k[0] == host]:
            del self._tokens[key]


class Authorizer:
    """One per process; shared by every request so tokens are fetched once."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Callable[[str], Credential | None],
        *,
        user_agent: str = "proxyd",
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[str], None] = lambda host: None,
        max_tokens: int = MAX_CACHED_TOKENS,
        allow_link_local: bool = False,
        via: Callable[[RegistryHost, str], Via] = lambda host, url: DIRECT,
    ) -> None:
        self._session = session
        self._allow_link_local = allow_link_local  # realms there (proxyd.targets)
        self._credentials = credentials
        self._user_agent = user_agent
        self._clock = clock
        self._challenges: dict[str, Challenge] = {}
        self._tokens = _TokenCache(max_tokens, clock)
        self._flights: SingleFlight[_Token] = SingleFlight()
        self._on_fetch = on_fetch
        self._via = via  # the host's forward proxy, to a URL

    def learn(
        self, host: RegistryHost, www_authenticate: list[str], *, refused: bool = False
    ) -> bool:
        """Remember a host's challenge from a 401; True when a retry could succeed.

        `refused`: the 401 answered credentials proxyd sent. Then, or when the bearer
        challenge says why (`error=`: RFC 6750's invalid_token, insufficient_scope),
        the host's cached tokens are dropped (containerd's AddResponses drops the
        host's handler): a retry must not send the refused token again."""
        challenges = parse_www_authenticate(www_authenticate)
        if refused or any(c.scheme == "bearer" and c.params.get("error") for c in challenges):
            self._tokens.drop_host(host.host)
        for challenge in sorted(challenges, key=lambda c: c.scheme != "bearer"):
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self._challenges[host.host] = challenge
                return True
            if challenge.scheme == "basic":
                self._challenges[host.host] = challenge
                return self._credentials(host.host) is not None
        return False

    def challenge_of(self, host: RegistryHost) -> str | None:
        """The scheme of the challenge learnt from `host` (bearer, basic), if any."""
        challenge = self._challenges.get(host.host)
        return challenge.scheme if challenge is not None else None

    async def authorization(
        self, host: RegistryHost, scope: str, ssl: Any = True, *, also: Iterable[str] = ()
    ) -> str | None:
        """The Authorization header value for a request to `host`, if it needs one.

        `scope` is the request's scope list (space-separated: its repository's, a mount
        source's); `also`, for the retry of a request the host refused, the scopes its
        challenge named. The token answers for the request's scopes and is kept under
        them; a challenge from another request never widens it."""
        challenge = self._challenges.get(host.host)
        if challenge is None:
            return None
        credential = self._credentials(host.host)
        if challenge.scheme == "basic":
            if credential is None or credential.username is None:
                return None
            return basic_authorization(credential.username, credential.password or "")
        if credential is not None and credential.registry_token:
            return f"Bearer {credential.registry_token}"
        try:
            token = await self._token(
                host,
                challenge,
                scope_list(scope.split()),
                scope_list(scope.split(), also),
                credential,
                ssl,
            )
        except TokenError:
            # Learn afresh next time: the registry may have moved its realm or dropped auth.
            self._challenges.pop(host.host, None)
            raise
        return f"Bearer {token.value}"

    async def _token(
        self,
        host: RegistryHost,
        challenge: Challenge,
        scopes: tuple[str, ...],
        asked: tuple[str, ...],
        credential: Credential | None,
        ssl: Any,
    ) -> _Token:
        """The token for `scopes`, fetched for `asked` (`scopes` and what a challenge
        added). A retry asking more than the request never takes a cached token: the
        cached one may be the token just refused for lacking the rest."""
        where = (host.host, challenge.params["realm"], challenge.params.get("service", ""))
        key = (*where, " ".join(scopes))
        cached = self._tokens.get(key) if asked == scopes else None
        if cached is not None:
            return cached

        async def fetch() -> _Token:
            token = await self._fetch(challenge.params, asked, credential, ssl, host)
            self._tokens.put(key, token)
            return token

        # One token request, however many wait for the same scopes.
        return await self._flights.run((*where, " ".join(asked)), fetch)

    async def _fetch(
        self,
        params: dict[str, str],
        scopes: tuple[str, ...],
        credential: Credential | None,
        ssl: Any,
        host: RegistryHost,
    ) -> _Token:
        self._on_fetch(host.host)
        realm = params["realm"]
        service = params.get("service", "")
        secret = credential and (credential.identity_token or credential.password)
        via = self._via(host, realm)  # the token server is reached as the host is
        log.debug("token.fetch", host=host.host, realm=realm, scope=scopes, oauth=bool(secret))
        headers = _token_headers(host, realm)
        try:
            if credential is not None and secret:
                form = {"service": service, "client_id": CLIENT_ID}
                if scopes:
                    form["scope"] = " ".join(scopes)  # oauth.md: one parameter, a list
                if credential.identity_token:
                    form.update(grant_type="refresh_token", refresh_token=credential.identity_token)
                else:
                    form.update(
                        grant_type="password",
                        username=credential.username or "",
                        password=credential.password or "",
                    )
                status, body = await self._call("POST", realm, ssl, headers, data=form, via=via)
                if status in _TOKEN_FALLBACK_STATUSES:
                    basic = basic_authorization(credential.username or "", secret)
                    status, body = await self._call(
                        "GET",
                        realm,
                        ssl,
                        headers,
                        basic,
                        params=_query(service, scopes),
                        via=via,
                    )
            else:
                status, body = await self._call(
                    "GET", realm, ssl, headers, params=_query(service, scopes), via=via
                )
        except targets.RefusedTarget as exc:
            raise TokenError(
                f"token server {realm} for {host.host}: {clienterrors.describe(exc)}"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenError(
                f"token server {realm} for {host.host} is unreachable: {clienterrors.describe(exc)}"
            ) from exc
        if status in (401, 403):
            asking = " ".join(scopes) or "no scope"
            if not secret:  # the GET went without credentials
                raise Unauthorized(
                    f"token server {realm} for {host.host} refused an anonymous token"
                    f" ({asking}; answered {status}) and proxyd has no credentials for it"
                )
            raise Unauthorized(
                f"token server {realm} refused proxyd's credentials for {host.host}"
                f" ({asking}; answered {status})"
            )
        if status != 200:
            raise TokenError(f"token server {realm} for {host.host} answered {status}")
        return self._parse(body, realm)

    async def _call(
        self,
        method: str,
        url: str,
        ssl: Any,
        extra: Iterable[tuple[str, str]],
        authorization: str = "",
        via: Via = DIRECT,
        *,
        data: dict[str, str] | None = None,
        params: list[tuple[str, str]] | None = None,
    ) -> tuple[int, bytes]:
        """One token request, its redirects followed by hand within the realm's origin:
        307 and 308 repeat it, the others turn a POST into a GET without its form. A
        redirect to another origin is refused (RefusedTarget) rather than followed with
        the credentials or without them."""
        timeout = aiohttp.ClientTimeout(total=30)
        headers: CIMultiDict[str] = CIMultiDict([("User-Agent", self._user_agent)])
        for name, value in (*via.headers.items(), *extra):
            headers.add(name, value)
        if authorization:
            headers["Authorization"] = authorization
        realm_origin = _origin(url)
        for _hop in range(targets.MAX_REDIRECTS + 1):
            targets.check(url, allow_link_local=self._allow_link_local)
            if _origin(url) != realm_origin:
                raise targets.RefusedTarget(
                    url,
                    "refused: the token server redirected to another origin (proxyd sends "
                    "credentials to the realm's origin only)",
                )
            async with self._session.request(
                method,
                url,
                headers=headers,
                timeout=timeout,
                ssl=ssl,
                data=data,
                params=params,
                allow_redirects=False,
                **via.arguments,  # the realm's origin throughout: the same proxy
            ) as resp:
                location = resp.headers.get("Location")
                if resp.status not in _REDIRECTS or not location:
                    return resp.status, await resp.content.read(1 << 20)
                url, params = urljoin(str(resp.url), location), None  # the whole URL now
                if resp.status not in (307, 308):
                    method, data = "GET", None
        raise targets.RefusedTarget(url, f"refused: more than {targets.MAX_REDIRECTS} redirects")

    def _parse(self, body: bytes, realm: str) -> _Token:
        try:
            data = json.loads(body)
        except ValueError:
            raise TokenError(f"token server {realm} did not answer JSON") from None
        value = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise TokenError(
                f"authorization server {realm} did not include a token in the response"
            )
        return _Token(value, self._clock() + token_lifetime(data.get("expires_in")))


def _query(service: str, scopes: tuple[str, ...]) -> list[tuple[str, str]]:
    """token.md: `scope` repeated, one scope each."""
    return [*([("service", service)] if service else []), *(("scope", s) for s in scopes)]


def _token_headers(host: RegistryHost, realm: str) -> tuple[tuple[str, str], ...]:
    """The host's configured headers (hosts.toml `header`) go to a realm on the host's
    own origin, as containerd's `WithAuthHeader` sends them; to a realm on another
    origin, none: they are configured for the registry and may be its secrets."""
    return host.headers if _origin(realm) == _origin(host.origin) else ()


def _origin(url: str) -> tuple[str, str, int | None]:
    """scheme, host and port, with the scheme's default port made explicit."""
    try:
        parts = urlsplit(url)
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    except ValueError:
        return ("", url, None)
    return (parts.scheme.lower(), (parts.hostname or "").lower(), port)


def token_lifetime(expires_in: object) -> float:
    """Seconds to keep a token the server says lasts `expires_in`: renewed early, so it
    never expires between proxyd's check and the registry's. Anything but a positive
    number (absent, a string, NaN) is DEFAULT_TOKEN_LIFETIME; a number is read as at
    least a second (the spec counts whole seconds; a denormal halved is 0) and at most
    MAX_TOKEN_LIFETIME (JSON numbers are unbounded: 10**400 is no float)."""
    seconds = float(DEFAULT_TOKEN_LIFETIME)
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        seconds = float(min(max(expires_in, 1), MAX_TOKEN_LIFETIME))  # NaN is not > 0
    return max(seconds - 10, seconds / 2)
