"""A Docker/OAuth2 token server for distribution's ``auth.token`` mode.

It issues ES256 JWTs signed by a fresh self-signed certificate, carried in the
token's ``x5c`` header; that certificate's PEM is distribution's ``rootcertbundle``.

Endpoints (both at ``/token``):

- ``GET /token?service=S&scope=repository:NAME:ACTIONS[&scope=...]``, anonymous or
  with Basic credentials (the Docker token protocol).  ``offline_token=true`` adds a
  refresh token.
- ``POST /token`` with an ``application/x-www-form-urlencoded`` body (the OAuth2
  protocol): ``grant_type=password`` with ``username``/``password``, or
  ``grant_type=refresh_token`` with ``refresh_token``; ``scope`` is space separated.
  ``access_type=offline`` adds a refresh token.

Policy: a known user gets every action asked for among ``pull``, ``push``,
``delete`` and ``*``; an anonymous client gets ``pull`` on the repositories listed
as public and nothing else (an empty grant, not an error, as real servers do);
wrong credentials get 401.  Every request is recorded, and so is every token issued.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import BasicAuth, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.peers.httpserver import (
    RecordedRequest,
    RequestLog,
    ThreadedServer,
    ThreadedService,
    record,
)

DEFAULT_USERS: Mapping[str, str] = {"alice": "wonderland"}
USER_ACTIONS = frozenset({"pull", "push", "delete", "*"})
ISSUER = "proxyd-test-token-issuer"


@dataclass(frozen=True)
class Scope:
    """``type:name:actions`` as in a token request's ``scope`` parameter."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not name:
            raise ValueError(f"malformed scope {text!r}")
        return cls(kind, name, tuple(a for a in actions.split(",") if a))


@dataclass(frozen=True)
class IssuedToken:
    """What the server granted, to whom, and how it was asked for."""

    subject: str
    service: str
    access: tuple[dict[str, Any], ...]
    via: str  # "get" or "post:password" or "post:refresh_token"
    claims: dict[str, Any]


@dataclass
class SigningKey:
    """An EC P-256 key and the self-signed certificate that carries its public half."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "proxyd test token signer") -> SigningKey:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def x5c(self) -> list[str]:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return [base64.b64encode(der).decode("ascii")]

    def sign(self, claims: Mapping[str, Any]) -> str:
        return jwt.encode(dict(claims), self.key, algorithm="ES256", headers={"x5c": self.x5c()})


@dataclass
class TokenPolicy:
    users: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_USERS))
    public_repos: tuple[str, ...] = ()  # fnmatch patterns anonymous clients may pull

    def grant(self, subject: str | None, scopes: Iterable[Scope]) -> list[dict[str, Any]]:
        access: list[dict[str, Any]] = []
        for scope in scopes:
            if subject is not None:
                if scope.type == "registry" and scope.name == "catalog":
                    actions = ["*"] if "*" in scope.actions else []
                else:
                    actions = [a for a in scope.actions if a in USER_ACTIONS]
            elif scope.type == "repository" and any(
                fnmatch.fnmatchcase(scope.name, pattern) for pattern in self.public_repos
            ):
                actions = [a for a in scope.actions if a == "pull"]
            else:
                actions = []
            if actions:
                access.append({"type": scope.type, "name": scope.name, "actions": actions})
        return access


class TokenServer(ThreadedService):
    """The token server, running in a background thread.

    ``realm`` is the URL to put in distribution's ``auth.token.realm``;
    ``write_rootcertbundle(path)`` writes the certificate it signs with.
    """

    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        public_repos: Iterable[str] = (),
        issuer: str = ISSUER,
        expires_in: int = 300,
    ) -> None:
        self.policy = TokenPolicy(
            users=dict(DEFAULT_USERS if users is None else users),
            public_repos=tuple(public_repos),
        )
        self.issuer = issuer
        self.expires_in = expires_in
        self.signing_key = SigningKey.generate()
        self.requests = RequestLog()
        self._issued: list[IssuedToken] = []
        self._refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_get("/token", self._handle_get)
        app.router.add_post("/token", self._handle_post)
        self._server = ThreadedServer(app, name="token-server")

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def write_rootcertbundle(self, path: Path) -> Path:
        path.write_bytes(self.signing_key.certificate_pem())
        return path

    # -- what tests look at ----------------------------------------------------

    def recorded(self) -> list[RecordedRequest]:
        return self.requests.snapshot()

    def issued(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._issued)

    def clear(self) -> None:
        self.requests.clear()
        with self._lock:
            self._issued.clear()

    def decode(self, token: str, *, audience: str) -> dict[str, Any]:
        """Verify ``token`` as distribution would and return its claims."""
        return jwt.decode(
            token,
            self.signing_key.key.public_key(),
            algorithms=["ES256"],
            audience=audience,
            issuer=self.issuer,
        )

    # -- handlers --------------------------------------------------------------

    async def _handle_get(self, request: web.Request) -> web.Response:
        await record(request, self.requests)
        subject: str | None = None
        header = request.headers.get("Authorization")
        if header is not None:
            try:
                auth = BasicAuth.decode(header)
            except ValueError:
                return _unauthorized("malformed Authorization header")
            if self.policy.users.get(auth.login) != auth.password:
                return _unauthorized("invalid username or password")
            subject = auth.login
        scopes = _parse_scopes(request.query.getall("scope", []))
        if isinstance(scopes, web.Response):
            return scopes
        offline = request.query.get("offline_token", "") == "true" and subject is not None
        return self._issue(
            subject,
            service=request.query.get("service", ""),
            scopes=scopes,
            via="get",
            offline=offline,
        )

    async def _handle_post(self, request: web.Request) -> web.Response:
        item = await record(request, self.requests)
        grant_type = item.form_value("grant_type")
        if grant_type == "password":
            username = item.form_value("username") or ""
            if self.policy.users.get(username) != item.form_value("password"):
                return _unauthorized("invalid username or password")
            subject = username
        elif grant_type == "refresh_token":
            with self._lock:
                known = self._refresh_tokens.get(item.form_value("refresh_token") or "")
            if known is None:
                return web.json_response(
                    {"error": "invalid_grant", "error_description": "unknown refresh token"},
                    status=400,
                )
            subject = known
        else:
            return web.json_response(
                {"error": "unsupported_grant_type", "error_description": repr(grant_type)},
                status=400,
            )
        scopes = _parse_scopes((item.form_value("scope") or "").split())
        if isinstance(scopes, web.Response):
            return scopes
        return self._issue(
            subject,
            service=item.form_value("service") or "",
            scopes=scopes,
            via=f"post:{grant_type}",
            offline=item.form_value("access_type") == "offline",
        )

    def _issue(
        self,
        subject: str | None,
        *,
        service: str,
        scopes: list[Scope],
        via: str,
        offline: bool,
    ) -> web.Response:
        now = int(time.time())
        access = self.policy.grant(subject, scopes)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject or "",
            "aud": service,
            "exp": now + self.expires_in,
            "nbf": now - 30,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        token = self.signing_key.sign(claims)
        issued_at = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued_at,
        }
        if offline and subject is not None:
            refresh = secrets.token_urlsafe(24)
            with self._lock:
                self._refresh_tokens[refresh] = subject
            body["refresh_token"] = refresh
        with self._lock:
            self._issued.append(IssuedToken(subject or "", service, tuple(access), via, claims))
        return web.json_response(body)


def _parse_scopes(texts: Iterable[str]) -> list[Scope] | web.Response:
    try:
        return [Scope.parse(t) for t in texts if t]
    except ValueError as err:
        return web.json_response(
            {"error": "invalid_scope", "error_description": str(err)}, status=400
        )


def _unauthorized(detail: str) -> web.Response:
    return web.json_response(
        {"errors": [{"code": "UNAUTHORIZED", "message": detail}]},
        status=401,
        headers={"WWW-Authenticate": 'Basic realm="proxyd-test-token-server"'},
    )
