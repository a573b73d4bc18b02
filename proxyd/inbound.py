"""Inbound access control: which clients may use proxyd, from an htpasswd file.

Without `htpasswd` every local client may pull and nobody is asked for credentials
(pushes are refused by `allow_push` alone). With it, clients authenticate with HTTP
Basic against the file's users (bcrypt hashes, `htpasswd -B`, the only format
distribution accepts), and `auth_required` says what needs it:

| request                          | `push` (default)          | `all`     |
|----------------------------------|---------------------------|-----------|
| `GET /v2/` (clients probe there) | checked when given        | required  |
| pulls (GET, HEAD)                | not checked               | required  |
| pushes (POST, PUT, PATCH, DELETE)| required                  | required  |

A refusal is a 401 with `WWW-Authenticate: Basic realm="proxyd"`. In `push` mode
`GET /v2/` answers 200 to anonymous clients with that challenge as a header, so
clients that learn challenges from the probe (skopeo, podman, buildah) send their
credentials with a push; `podman login` still fails on a wrong password.

Every hash is checked when the file is read (at start, and again on SIGHUP): a
malformed one (a salt bcrypt refuses, a cost outside 4-31) is an error naming its line,
never a failure of each request that meets it. As distribution (and bcrypt itself)
reads a password, only its first 72 bytes count. bcrypt is slow on purpose, so a
successful check is remembered for a minute, keyed by a SHA-256 of the Authorization
header (never the header itself). Inbound
credentials are never forwarded upstream: the upstream client builds its headers
from the host's configuration and what the core passes explicitly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog

from proxyd.errors import Unauthorized
from proxyd.singleflight import SingleFlight

log = structlog.get_logger("proxyd.inbound")

AuthRequired = Literal["push", "all"]
REALM = "proxyd"
CHALLENGE = f'Basic realm="{REALM}"'
BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
_BCRYPT = re.compile(r"\$2[aby]\$(?:0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
BCRYPT_PASSWORD_BYTES = 72  # what bcrypt reads of a password (bcrypt 5 refuses more)
CACHE_SECONDS = 60.0
CACHE_ENTRIES = 1024
_READS = frozenset({"GET", "HEAD"})

Need = Literal["none", "if-given", "required"]


def parse_htpasswd(text: str, source: str) -> dict[str, bytes]:
    """`user:hash` lines (blank lines and `#` comments skipped); bcrypt only."""
    users: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise ValueError(f"{source}, line {number}: expected user:hash")
        if not hashed.startswith(BCRYPT_PREFIXES):
            raise ValueError(
                f"{source}, line {number}: the hash of {user!r} is not bcrypt; only bcrypt "
                "($2y$, $2b$: `htpasswd -B`) is accepted, as by distribution"
            )
        if not well_formed_bcrypt(hashed):
            raise ValueError(
                f"{source}, line {number}: the bcrypt hash of {user!r} is malformed (bcrypt "
                "cannot check a password against it); make it again with `htpasswd -B`"
            )
        users[user] = hashed.encode()
    if not users:
        raise ValueError(f"{source} names no user")
    return users


def well_formed_bcrypt(hashed: str) -> bool:
    """`$2y$<cost>$<salt><hash>` as bcrypt reads it: the shape, then the salt read by
    bcrypt itself (it refuses some salts of the right shape) at the lowest cost, so
    the check takes a millisecond whatever the hash's own cost."""
    if not _BCRYPT.fullmatch(hashed):
        return False
    import bcrypt  # here: a daemon without users never loads it (loading users does)

    try:
        bcrypt.hashpw(b"", f"{hashed[:4]}04{hashed[6:29]}".encode())
    except ValueError:
        return False
    return True


def load_htpasswd(path: Path) -> dict[str, bytes]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read htpasswd file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"htpasswd file {path} is not text") from None
    return parse_htpasswd(text, str(path))


def need(required: AuthRequired, method: str, path: str) -> Need:
    """What a request needs under `required` (the table of the module docstring)."""
    if path in ("/v2", "/v2/"):
        return "required" if required == "all" else "if-given"
    if not path.startswith("/v2/"):
        return "none"  # /healthz, /readyz, /metrics
    if required == "all" or method not in _READS:
        return "required"
    return "none"


def basic_credentials(header: str) -> tuple[str, str] | None:
    """`Basic base64(user:password)`; None for anything else or an empty user (what
    clients without credentials send after a Basic challenge)."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


@dataclass
class _Remembered:
    user: str
    until: float


class InboundAuth:
    """Checks clients' Basic credentials against the htpasswd users."""

    def __init__(
        self,
        users: dict[str, bytes],
        required: AuthRequired,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not users:
            raise ValueError("inbound authentication needs at least one user")
        self.users = users
        self.required: AuthRequired = required
        self._clock = clock
        self._remembered: dict[str, _Remembered] = {}
        self._flights: SingleFlight[str | None] = SingleFlight()
        # An unknown user is checked against a real hash too: same cost, same timing.
        self._decoy = next(iter(users.values()))

    def replace_users(self, users: dict[str, bytes]) -> None:
        """The htpasswd file read again: its users from now on, and no check of the
        old ones remembered."""
        if not users:
            raise ValueError("inbound authentication needs at least one user")
        self.users = users
        self._decoy = next(iter(users.values()))
        self._remembered.clear()

    async def authenticate(self, method: str, path: str, header: str | None) -> str | None:
        """The user the request speaks for, or None (anonymous, where allowed); raise
        Unauthorized (with the Basic challenge) where credentials are needed."""
        needed = need(self.required, method, path)
        if needed == "none":
            return None
        credentials = basic_credentials(header) if header else None
        if credentials is None:
            if needed == "required":
                raise self._refusal("proxyd requires credentials for this request")
            return None
        user = await self.check(header or "", *credentials)
        if user is None:
            raise self._refusal("invalid username or password")
        return user

    async def check(self, header: str, user: str, password: str) -> str | None:
        key = hashlib.sha256(header.encode()).hexdigest()
        remembered = self._remembered.get(key)
        now = self._clock()
        if remembered is not None and remembered.until > now:
            return remembered.user

        async def verify() -> str | None:
            hashed = self.users.get(user, self._decoy)
            ok = await asyncio.to_thread(_matches, password.encode(), hashed)
            if not ok or user not in self.users:
                return None
            self._remember(key, user)
            return user

        return await self._flights.run(key, verify)

    def _remember(self, key: str, user: str) -> None:
        now = self._clock()
        if len(self._remembered) >= CACHE_ENTRIES:
            self._remembered = {k: r for k, r in self._remembered.items() if r.until > now}
            if len(self._remembered) >= CACHE_ENTRIES:
                self._remembered.clear()
        self._remembered[key] = _Remembered(user, now + CACHE_SECONDS)

    @staticmethod
    def _refusal(message: str) -> Unauthorized:
        return Unauthorized(message, headers={"WWW-Authenticate": CHALLENGE})


def _matches(password: bytes, hashed: bytes) -> bool:
    """bcrypt's check of the password's first 72 bytes; a hash it cannot check (which
    loading refuses, so a bug) refuses the password instead of failing the request."""
    import bcrypt  # loaded with the users already (well_formed_bcrypt)

    try:
        return bcrypt.checkpw(password[:BCRYPT_PASSWORD_BYTES], hashed)
    except ValueError as exc:
        log.error("inbound.unverifiable", error=str(exc))
        return False
