"""Upload sessions in Redis, shared by the replicas behind one address (`[cluster]`):
a push whose POST, PATCHes and PUT land on different replicas is one upload, whichever
replica receives each request, as `UploadTracker` makes it within one process.

A session is a hash `proxyd:uploads:<uuid>` (namespace, repository, the upstream
host, its latest location, the offset upstream confirmed, the user), kept for twice
`upload_ttl` (and a minute) past its last use; `proxyd:uploads:idle` orders the sessions by that
last use (wall-clock seconds, comparable between replicas). One request at a time
works on a session: a claim is a lock `proxyd:uploads:<uuid>:busy` (`SET NX`, for
at most `upload_ttl`), given back with the session's new state in one script. An
idle session is taken out of Redis by exactly one replica (an atomic `ZREM`), which
cancels it upstream.

The local copy a pushed blob is hashed into stays this replica's: kept between
requests while it holds exactly what upstream holds (every byte of the upload went
through this replica); otherwise it is dropped and the blob simply is not stored
here (a copy whose upload went on elsewhere goes after a minute). When Redis is
unreachable, new uploads live in this process alone (an `UploadTracker`), as without
a fleet; a session kept in Redis cannot be found meanwhile, and its client starts
the upload again.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import structlog

from proxyd.errors import BlobUploadInvalid, BlobUploadUnknown
from proxyd.fleetredis import FleetRedis, RedisUnreachable
from proxyd.hosts import Namespace, RegistryHost, Target
from proxyd.store import BlobWriter
from proxyd.uploads import UUID_RE, UploadSession, UploadTracker

log = structlog.get_logger("proxyd.uploads")

PREFIX = "proxyd:uploads:"
IDLE = PREFIX + "idle"
EXPIRED_AT_ONCE = 100  # idle sessions taken per expiry round
KEEP_BEYOND = 60.0  # seconds a session's hash outlives its TTL, for the expiry to find it
COPY_IDLE = 60.0  # seconds a local copy waits for its upload's next request here

# KEYS hash busy; ARGV token lease_ms -> {0}: unknown, {1}: busy, else the hash's fields
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS hash busy idle; ARGV token keep_ms uuid last_used field value ...
_RELEASE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS busy; ARGV token
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS idle hash busy; ARGV uuid deadline -> the hash's fields, or {} (not idle, or gone)
_TAKE_IDLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return {} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {} end
redis.call('ZREM', KEYS[1], ARGV[1])
local fields = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2])
return fields
"""


class SharedUploads:
    """`UploadSessions` in Redis; see the module docstring."""

    def __init__(
        self,
        redis: FleetRedis,
        *,
        ttl: float,
        namespaces: Callable[[str], Namespace | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.ttl = ttl
        self.clock = clock
        self._namespaces = namespaces  # for a session expired with no request to name it
        self.local = UploadTracker(ttl, clock=clock)  # opened while Redis was unreachable
        # This replica's local copies, by uuid, with their last use (a copy whose upload
        # went on elsewhere is dropped after COPY_IDLE: its file is not left behind).
        self._copies: dict[str, tuple[BlobWriter, float]] = {}
        self._claims: dict[str, str] = {}  # uuid -> this replica's lock token
        self._claim = redis.script(_CLAIM)
        self._release = redis.script(_RELEASE)
        self._unlock = redis.script(_UNLOCK)
        self._take_idle = redis.script(_TAKE_IDLE)

    async def open(
        self, target: Target, host: RegistryHost, location: str, user: str | None
    ) -> UploadSession:
        session = UploadSession(
            secrets.token_urlsafe(24), target, host, location, user, self.clock()
        )
        fields = _fields(session)
        keep = self._keep_ms

        async def create(client: Any) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hset(PREFIX + session.uuid, mapping=fields)
                pipe.pexpire(PREFIX + session.uuid, keep)
                pipe.zadd(IDLE, {session.uuid: session.last_used})
                await pipe.execute()

        try:
            await self.redis.call("upload_open", create)
        except RedisUnreachable:
            return await self.local.open(target, host, location, user)
        return session

    async def claim(self, uuid: str, target: Target, user: str | None) -> UploadSession:
        if self.local.holds(uuid):
            return await self.local.claim(uuid, target, user)
        unknown = BlobUploadUnknown(f"upload {uuid} is unknown to proxyd (or it expired)")
        if not UUID_RE.fullmatch(uuid):
            raise unknown
        token = secrets.token_hex(8)
        try:
            answer = await self.redis.run_script(
                "upload_claim", self._claim, _keys(uuid)[:2], [token, _ms(self.ttl)]
            )
        except RedisUnreachable:
            raise BlobUploadUnknown(
                f"upload {uuid} is kept in the fleet's Redis, which does not answer: "
                "start the upload again"
            ) from None
        if answer == [0]:
            self._drop_copy(uuid)  # finished or cancelled on another replica
            raise unknown
        if answer == [1]:
            raise BlobUploadInvalid(f"upload {uuid} is busy with another request")
        self._claims[uuid] = token
        try:
            session = self._session(uuid, _decoded(answer), target)
        except BlobUploadUnknown:
            await self.release_lock(uuid)
            raise
        if session.user is not None and session.user != user:
            await self.release_lock(uuid)
            raise unknown
        session.busy = True
        copy, _ = self._copies.pop(uuid, (None, 0.0))
        if copy is not None:
            if session.offset is not None and copy.written == session.offset:
                session.writer = copy  # every byte so far went through this replica
            else:
                copy.close()  # another replica took a chunk: the copy is not the blob
        return session

    async def release(self, session: UploadSession) -> None:
        if self.local.holds(session.uuid):
            await self.local.release(session)
            return
        session.busy = False
        token = self._claims.pop(session.uuid, "")
        if session.closed:
            return
        session.last_used = self.clock()
        try:
            await self.redis.run_script(
                "upload_release", self._release, _keys(session.uuid), self._state(session, token)
            )
        except RedisUnreachable:
            session.drop_copy()  # what Redis says of the upload is now older than this
            return
        if session.writer is not None:
            self._copies[session.uuid] = (session.writer, self.clock())
            session.writer = None

    async def release_lock(self, uuid: str) -> None:
        """Give the claim back, leaving the session as it was."""
        token = self._claims.pop(uuid, "")
        with contextlib.suppress(RedisUnreachable):  # else the lock lapses by itself
            await self.redis.run_script("upload_unlock", self._unlock, [_keys(uuid)[1]], [token])

    async def close(self, session: UploadSession) -> None:
        if self.local.holds(session.uuid):
            await self.local.close(session)
            return
        session.closed = True
        session.drop_copy()
        self._drop_copy(session.uuid)
        self._claims.pop(session.uuid, None)
        uuid = session.uuid

        async def forget(client: Any) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.delete(*_keys(uuid)[:2]).zrem(IDLE, uuid)
                await pipe.execute()

        with contextlib.suppress(RedisUnreachable):  # else it expires by itself
            await self.redis.call("upload_close", forget)

    async def expired(self) -> list[UploadSession]:
        """The sessions idle longer than the TTL that this replica took out of Redis
        (each is taken by one replica only), and this process's own."""
        idle = await self.local.expired()
        stale = self.clock() - min(COPY_IDLE, self.ttl)
        for uuid in [u for u, (_, used) in self._copies.items() if used < stale]:
            self._drop_copy(uuid)
        deadline = self.clock() - self.ttl
        try:
            uuids = await self.redis.call(
                "upload_expire",
                lambda r: r.zrangebyscore(IDLE, "-inf", deadline, start=0, num=EXPIRED_AT_ONCE),
            )
        except RedisUnreachable:
            return idle
        for raw in uuids:
            uuid = raw.decode() if isinstance(raw, bytes) else str(raw)
            keys = _keys(uuid)
            try:
                fields = await self.redis.run_script(
                    "upload_expire", self._take_idle, [IDLE, keys[0], keys[1]], [uuid, deadline]
                )
            except RedisUnreachable:
                break
            self._drop_copy(uuid)
            if not fields:
                continue
            session = self._expired_session(uuid, _decoded(fields))
            if session is not None:
                session.closed = True
                idle.append(session)
        return idle

    async def close_all(self) -> None:
        """This process stops: its local copies go; the sessions stay in Redis for the
        other replicas to continue."""
        await self.local.close_all()
        for uuid in list(self._copies):
            self._drop_copy(uuid)

    def _drop_copy(self, uuid: str) -> None:
        copy, _ = self._copies.pop(uuid, (None, 0.0))
        if copy is not None:
            copy.close()

    @property
    def _keep_ms(self) -> int:
        return _ms(self.ttl * 2 + KEEP_BEYOND)

    # -- the hash ---------------------------------------------------------------------

    def _state(self, session: UploadSession, token: str) -> list[Any]:
        """The release script's arguments: what a request changed of the session."""
        fields = _fields(session)
        args: list[Any] = [token, self._keep_ms, session.uuid, session.last_used]
        return [*args, "location", fields["location"], "offset", fields["offset"]]

    def _session(self, uuid: str, fields: dict[str, str], target: Target) -> UploadSession:
        """The session as Redis holds it, for a request about `target`."""
        unknown = BlobUploadUnknown(f"upload {uuid} is unknown to proxyd (or it expired)")
        if (fields.get("namespace"), fields.get("repository")) != (
            target.namespace.name,
            target.repository,
        ):
            raise unknown
        host = _host(target.namespace, fields)
        if host is None:
            raise unknown
        offset = fields.get("offset", "")
        return UploadSession(
            uuid,
            target,
            host,
            fields.get("location", ""),
            fields.get("user") or None,
            self.clock(),
            offset=int(offset) if offset.isdigit() else None,
        )

    def _expired_session(self, uuid: str, fields: dict[str, str]) -> UploadSession | None:
        namespace = self._namespaces(fields.get("namespace", ""))
        if namespace is None:
            return None
        target = Target(namespace, fields.get("repository", ""))
        try:
            return self._session(uuid, fields, target)
        except BlobUploadUnknown:
            return None


def _fields(session: UploadSession) -> dict[str, str]:
    fields = {
        "namespace": session.target.namespace.name,
        "repository": session.target.repository,
        "origin": session.host.origin,
        "path": session.host.path,
        "location": session.location,
        "offset": "" if session.offset is None else str(session.offset),
    }
    if session.user is not None:
        fields["user"] = session.user
    return fields


def _host(namespace: Namespace, fields: dict[str, str]) -> RegistryHost | None:
    """The namespace's host the upload lives on (replicas share their configuration:
    a host this replica does not know is no upload it can continue)."""
    host = namespace.push_host
    if host is None or (host.origin, host.path) != (fields.get("origin"), fields.get("path")):
        return None
    return host


def _decoded(flat: list[Any]) -> dict[str, str]:
    text = [item.decode() if isinstance(item, bytes) else str(item) for item in flat]
    return dict(zip(text[::2], text[1::2], strict=True))


def _keys(uuid: str) -> list[str]:
    """The session's hash, its lock, and the index of idle sessions."""
    return [PREFIX + uuid, PREFIX + uuid + ":busy", IDLE]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
