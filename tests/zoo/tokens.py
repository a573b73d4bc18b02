"""A token service in the shape of distribution's token spec
(docs/content/spec/auth/token.md), which Docker Hub's auth.docker.io, ghcr.io/token and
Harbor's /service/token each follow in their own way (their modules say how):

- `GET <realm>?service=S&scope=repository:NAME:ACTIONS[&scope=…]`, anonymous or with
  Basic credentials; several scopes repeat the parameter ("This query parameter should
  be specified multiple times"); a space-separated list in one parameter is read too,
  as Harbor's `parseScopes` splits it (src/core/service/token/creator.go);
- wrong credentials are a 401; a client with less access than it asked (an anonymous
  one, say) gets a token for what it may do, possibly nothing: "it must not be
  considered an error";
- the answer is JSON holding `token`, and, as each service does, `access_token`,
  `expires_in` and `issued_at`.

Tokens here are opaque random strings the registry looks up (`grant`), not the JWTs the
real services sign: what a registry does with a token (accept it for what it grants,
until it expires) is the same. A lifetime the service states is kept on the real clock,
as the service's own would be. A POST (the OAuth2 form of oauth.md) is a 405 unless a
subclass takes it: the zoo's pulls are anonymous, or, for Harbor, meet a service that
has no POST.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.peers.httpserver import RecordedRequest, RequestLog, record


@dataclass(frozen=True)
class Grant:
    """What one token allows: actions per repository, until `expires_at` (a
    `time.time()` reading; None: no end stated)."""

    subject: str | None
    access: Mapping[str, frozenset[str]]
    expires_at: float | None

    def allows(self, repository: str, action: str) -> bool:
        return action in self.access.get(repository, frozenset())


class TokenService:
    """Issues tokens at `path`; `policy` says which actions `subject` (None: anonymous)
    gets on a repository when it asks for `actions` there."""

    path = "/token"

    def __init__(
        self,
        *,
        service: str,
        users: Mapping[str, str] | None = None,
        expires_in: int | None = None,
    ) -> None:
        self.service = service
        self.users = dict(users or {})
        self.expires_in = expires_in
        self.requests = RequestLog()
        self.origin = ""
        self._grants: dict[str, Grant] = {}

    @property
    def realm(self) -> str:
        return f"{self.origin}{self.path}"

    def policy(self, subject: str | None, repository: str, actions: set[str]) -> set[str]:
        return set()

    def answer(self, token: str) -> dict[str, Any]:
        """The JSON body a token is handed out in."""
        body: dict[str, Any] = {"token": token}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return body

    def grant(self, token: str) -> Grant | None:
        """What `token` allows now; None when this service never issued it, or it has
        expired."""
        found = self._grants.get(token)
        if found is None or (found.expires_at is not None and time.time() >= found.expires_at):
            return None
        return found

    def issued(self) -> list[tuple[str, Grant]]:
        """Every token handed out, in order, with what it grants."""
        return list(self._grants.items())

    def recorded(self, method: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests.snapshot() if method in (None, r.method)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", self.path, self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        await record(request, self.requests)
        if request.method != "GET":
            return web.json_response({"error": "method not allowed"}, status=405)
        subject: str | None = None
        if "Authorization" in request.headers:
            subject = self._user(request.headers["Authorization"])
            if subject is None:
                return web.json_response({"details": "incorrect username or password"}, 401)
        asked = [s for value in request.query.getall("scope", []) for s in value.split(" ") if s]
        access: dict[str, frozenset[str]] = {}
        for scope in asked:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            granted = self.policy(subject, name, set(actions.split(",")))
            if granted:
                access[name] = frozenset(granted) | access.get(name, frozenset())
        token = secrets.token_urlsafe(24)
        ends = time.time() + self.expires_in if self.expires_in is not None else None
        self._grants[token] = Grant(subject, access, ends)
        return web.json_response(self.answer(token))

    def _user(self, header: str) -> str | None:
        """The user a Basic `Authorization` names, if the password is theirs."""
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user if self.users.get(user) == password else None


def issued_at() -> str:
    """Now, RFC 3339, as `issued_at` is written."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
