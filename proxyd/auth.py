"""The central authorizer: answers upstream 401 challenges so clients never hold
upstream secrets (containerd's `NewDockerAuthorizer`).

It learns each host's challenge from a 401 (`AddResponses`), fetches and caches
bearer tokens per (host, realm, service, scope) until they expire, and from then on
authorizes requests to that host before sending them. Credentials are looked up by
the exact host they belong to; nothing here ever attaches them elsewhere.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from proxyd import clienterrors
from proxyd.credentials import Credential
from proxyd.errors import TokenError, Unauthorized
from proxyd.hosts import RegistryHost
from proxyd.proxies import DIRECT, Via
from proxyd.singleflight import SingleFlight

log = structlog.get_logger("proxyd.auth")

DEFAULT_TOKEN_LIFETIME = 60  # seconds, when the token server gives no expires_in
MAX_TOKEN_LIFETIME = 86400  # seconds: however long a token server says a token lasts
CLIENT_ID = "proxyd"
_TOKEN_FALLBACK_STATUSES = (400, 401, 404, 405)  # POST unsupported: try GET (as containerd)


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


def basic_authorization(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass
class _Token:
    value: str
    expires_at: float


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
        via: Callable[[RegistryHost, str], Via] = lambda host, url: DIRECT,
    ) -> None:
        self._session = session
        self._credentials = credentials
        self._user_agent = user_agent
        self._clock = clock
        self._challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._flights: SingleFlight[_Token] = SingleFlight()
        self._on_fetch = on_fetch
        self._via = via  # the host's forward proxy, to a URL

    def learn(self, host: RegistryHost, www_authenticate: list[str]) -> bool:
        """Remember a host's challenge from a 401; True when a retry could succeed."""
        challenges = parse_www_authenticate(www_authenticate)
        for challenge in sorted(challenges, key=lambda c: c.scheme != "bearer"):
            if challenge.scheme == "bearer" and "realm" in challenge.params:
                self._challenges[host.host] = challenge
                return True
            if challenge.scheme == "basic":
                self._challenges[host.host] = challenge
                return self._credentials(host.host) is not None
        return False

    def forget(self, host: RegistryHost, scope: str) -> None:
        """Drop cached tokens for a scope the host has just refused."""
        for key in [k for k in self._tokens if k[0] == host.host and scope in k[-1].split()]:
            del self._tokens[key]

    async def authorization(self, host: RegistryHost, scope: str, ssl: Any = True) -> str | None:
        """The Authorization header value for a request to `host`, if it needs one."""
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
        scopes = {scope} if scope else set()
        if challenge.params.get("scope"):
            scopes.update(challenge.params["scope"].split())
        try:
            token = await self._token(host, challenge, " ".join(sorted(scopes)), credential, ssl)
        except TokenError:
            # Learn afresh next time: the registry may have moved its realm or dropped auth.
            self._challenges.pop(host.host, None)
            raise
        return f"Bearer {token.value}"

    async def _token(
        self,
        host: RegistryHost,
        challenge: Challenge,
        scope: str,
        credential: Credential | None,
        ssl: Any,
    ) -> _Token:
        key = (host.host, challenge.params["realm"], challenge.params.get("service", ""), scope)
        cached = self._tokens.get(key)
        if cached is not None and cached.expires_at > self._clock():
            return cached

        async def fetch() -> _Token:
            token = await self._fetch(challenge.params, scope, credential, ssl, host)
            self._tokens[key] = token
            return token

        return await self._flights.run(key, fetch)  # one token request, however many wait

    async def _fetch(
        self,
        params: dict[str, str],
        scope: str,
        credential: Credential | None,
        ssl: Any,
        host: RegistryHost,
    ) -> _Token:
        self._on_fetch(host.host)
        realm = params["realm"]
        service = params.get("service", "")
        secret = credential and (credential.identity_token or credential.password)
        via = self._via(host, realm)  # the token server is reached as the host is
        log.debug("token.fetch", host=host.host, realm=realm, scope=scope, oauth=bool(secret))
        try:
            if credential is not None and secret:
                form = {"service": service, "scope": scope, "client_id": CLIENT_ID}
                if credential.identity_token:
                    form.update(grant_type="refresh_token", refresh_token=credential.identity_token)
                else:
                    form.update(
                        grant_type="password",
                        username=credential.username or "",
                        password=credential.password or "",
                    )
                status, body = await self._call("POST", realm, ssl, data=form, via=via)
                if status in _TOKEN_FALLBACK_STATUSES:
                    basic = basic_authorization(credential.username or "", secret)
                    status, body = await self._call(
                        "GET",
                        realm,
                        ssl,
                        params=self._query(service, scope),
                        authorization=basic,
                        via=via,
                    )
            else:
                status, body = await self._call(
                    "GET", realm, ssl, params=self._query(service, scope), via=via
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TokenError(
                f"token server {realm} for {host.host} is unreachable: {clienterrors.describe(exc)}"
            ) from exc
        if status in (401, 403):
            raise Unauthorized(
                f"token server {realm} refused proxyd's credentials for {host.host}"
                f" ({scope or 'no scope'})"
            )
        if status != 200:
            raise TokenError(f"token server {realm} for {host.host} answered {status}")
        return self._parse(body, realm)

    @staticmethod
    def _query(service: str, scope: str) -> dict[str, str]:
        query = {"service": service} if service else {}
        if scope:
            query["scope"] = scope
        return query

    async def _call(
        self,
        method: str,
        url: str,
        ssl: Any,
        authorization: str = "",
        via: Via = DIRECT,
        **kwargs: Any,
    ) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=30)
        headers = {"User-Agent": self._user_agent, **via.headers}
        if authorization:
            headers["Authorization"] = authorization
        async with self._session.request(
            method, url, headers=headers, timeout=timeout, ssl=ssl, **via.arguments, **kwargs
        ) as resp:
            return resp.status, await resp.content.read(1 << 20)

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


def token_lifetime(expires_in: object) -> float:
    """Seconds to keep a token the server says lasts `expires_in`: renewed early, so it
    never expires between proxyd's check and the registry's. Anything but a positive
    number (absent, a string, NaN) is DEFAULT_TOKEN_LIFETIME, and no number is more
    than MAX_TOKEN_LIFETIME (JSON numbers are unbounded: 10**400 is no float)."""
    seconds = float(DEFAULT_TOKEN_LIFETIME)
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
        seconds = float(min(expires_in, MAX_TOKEN_LIFETIME))  # NaN is not > 0
    return max(seconds - 10, seconds / 2)
