"""Upload sessions: proxyd's side of the blob uploads in flight (containerd's
`StatusTracker`: the registry keeps no upload state a client could cheaply ask for,
so the tracker remembers it).

A client knows an upload by proxyd's UUID, at `/v2/<name>/blobs/uploads/<uuid>`.
Behind it proxyd keeps the upstream host the upload started on (every later request
goes there), the location the registry last answered (absolute or relative, with
its query: distribution signs the offset into `_state`, so only the latest is
valid), the offset upstream confirmed, and a local copy of the bytes so far, kept
only while it is exactly what upstream holds. An upload idle for `upload_ttl`
seconds is abandoned: the tracker hands it back for cleaning up.

The distribution spec lets a registry backed by object storage answer with a
`Location` on another origin, and containerd's pusher follows it with its
authorizer stripped. proxyd follows it too, as an absolute URL: the exchange sends
nothing of the registry's there (no credentials, no configured headers, no client
certificate), as with a redirect.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from proxyd.errors import BlobUploadInvalid, BlobUploadUnknown, UpstreamError
from proxyd.exchange import is_absolute
from proxyd.hosts import RegistryHost, Target
from proxyd.reference import Digest
from proxyd.store import BlobWriter

# A chunked upload's digest arrives with its last request; until then its local copy
# is hashed as sha256 and checked against the real digest at the end.
PENDING = Digest("sha256", "0" * 64)
UUID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
# At most 18 digits each (an exabyte): a longer number is no upload's offset, and
# Python's int() refuses past 4,300 digits.
_RANGE_RE = re.compile(r"^\s*(?:bytes[ =])?(\d{1,18})-(\d{1,18})(?!\d)", re.ASCII)


@dataclass(eq=False)
class UploadSession:
    uuid: str
    target: Target
    host: RegistryHost  # where the upload lives; never another host of the chain
    location: str  # as the registry last sent it
    user: str | None  # the inbound user who started it (None: anonymous)
    last_used: float
    offset: int | None = 0  # bytes upstream holds; None: unknown until asked
    writer: BlobWriter | None = None  # the local copy, while it matches upstream
    busy: bool = False  # a request is working on it
    closed: bool = False  # over (finished, cancelled, expired): never to be written back
    suffix: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.move(self.location)

    def move(self, location: str) -> None:
        """Take the registry's latest location for this upload (a relative one read
        against where the upload stands now)."""
        current = self.url if self.suffix else None
        self.suffix = upstream_suffix(self.host, self.target.repository, location, current)
        self.location = location

    @property
    def url(self) -> str:
        """Where the upload's next request goes."""
        if is_absolute(self.suffix):
            return self.suffix
        return self.host.url(f"{self.target.repository}/{self.suffix}")

    def drop_copy(self) -> None:
        """The local copy may differ from what upstream holds: keep nothing of it."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @property
    def range_header(self) -> str:
        """`0-<last byte>` as registries send it (`0-0` for an empty upload)."""
        return f"0-{max((self.offset or 0) - 1, 0)}"


def upstream_suffix(
    host: RegistryHost, repository: str, location: str, current: str | None = None
) -> str:
    """The upload location as `UpstreamClient.request` takes it, read against
    `current` (the upload's URL so far; at first, the repository's uploads): on the
    registry's origin, the part below the repository (`blobs/uploads/<id>?…`), which
    must lie inside it; on another origin (object storage), the absolute URL, which
    the exchange sends no credentials to. The query is kept byte for byte."""
    base = current or host.url(f"{repository}/blobs/uploads/")
    try:
        parts = urlsplit(urljoin(base, location))
    except ValueError:
        raise UpstreamError(f"{host.host} sent a malformed upload location") from None
    query = f"?{parts.query}" if parts.query else ""
    origin = f"{parts.scheme}://{parts.netloc}"
    if origin != host.origin:
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UpstreamError(f"{host.host} sent an upload location proxyd cannot follow")
        return f"{origin}{parts.path or '/'}{query}"
    root = urlsplit(host.url(f"{repository}/")).path
    if not parts.path.startswith(root) or len(parts.path) == len(root):
        raise UpstreamError(f"{host.host} sent an upload location outside {repository}")
    return parts.path[len(root) :] + query


def confirmed_offset(range_header: str | None, expected: int | None) -> int | None:
    """The offset a registry's `Range: 0-<last>` confirms. `0-0` means no byte or
    one byte (distribution's convention), so there `expected` decides when it can;
    a Range that cannot be read (absent, malformed, absurdly large) confirms nothing
    and `expected` stands."""
    match = _RANGE_RE.match(range_header or "")
    if match is None:
        return expected
    end = int(match[2])
    if end > 0:
        return end + 1
    return expected if expected in (0, 1) else None


def parse_content_range(value: str) -> tuple[int, int]:
    """A chunk's `Content-Range: <first>-<last>` (inclusive); a client's malformed or
    absurdly large one is its BlobUploadInvalid."""
    match = _RANGE_RE.match(value)
    if match is None or int(match[1]) > int(match[2]):
        raise BlobUploadInvalid(f"invalid Content-Range {value!r}: expected <first>-<last>")
    return int(match[1]), int(match[2])


class UploadSessions(Protocol):
    """Where the sessions live: in this process (`UploadTracker`), or in Redis for the
    replicas behind one address (`proxyd.fleetuploads`). Each session is used by one
    request at a time: `claim` it, then `release` (or `close`) it; `release` saves
    what the request changed (the request that opened it releases it too)."""

    ttl: float

    async def open(
        self, target: Target, host: RegistryHost, location: str, user: str | None
    ) -> UploadSession: ...

    async def claim(self, uuid: str, target: Target, user: str | None) -> UploadSession: ...

    async def release(self, session: UploadSession) -> None: ...

    async def close(self, session: UploadSession) -> None: ...

    async def expired(self) -> list[UploadSession]: ...

    async def close_all(self) -> None: ...


class UploadTracker:
    """The sessions by UUID, in this process; each is used by one request at a time."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._sessions: dict[str, UploadSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def holds(self, uuid: str) -> bool:
        return uuid in self._sessions

    async def open(
        self, target: Target, host: RegistryHost, location: str, user: str | None
    ) -> UploadSession:
        session = UploadSession(
            secrets.token_urlsafe(24), target, host, location, user, self.clock()
        )
        self._sessions[session.uuid] = session
        return session

    def find(self, uuid: str, target: Target, user: str | None) -> UploadSession:
        """The session of `uuid`, if it belongs to this repository and user."""
        session = self._sessions.get(uuid) if UUID_RE.fullmatch(uuid) else None
        if (
            session is None
            or session.target != target
            or (session.user is not None and session.user != user)
        ):
            raise BlobUploadUnknown(f"upload {uuid} is unknown to proxyd (or it expired)")
        session.last_used = self.clock()
        return session

    async def claim(self, uuid: str, target: Target, user: str | None) -> UploadSession:
        """`find`, and mark it busy until `release`."""
        session = self.find(uuid, target, user)
        if session.busy:
            raise BlobUploadInvalid(f"upload {uuid} is busy with another request")
        session.busy = True
        return session

    async def release(self, session: UploadSession) -> None:
        session.busy = False
        session.last_used = self.clock()

    async def close(self, session: UploadSession) -> None:
        self.forget(session)

    def forget(self, session: UploadSession) -> None:
        """Forget the session and discard its local copy (unless committed)."""
        session.closed = True
        self._sessions.pop(session.uuid, None)
        session.drop_copy()

    async def expired(self) -> list[UploadSession]:
        """Remove and return the sessions idle longer than the TTL."""
        deadline = self.clock() - self.ttl
        idle = [s for s in self._sessions.values() if not s.busy and s.last_used < deadline]
        for session in idle:
            self.forget(session)
        return idle

    async def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.forget(session)
