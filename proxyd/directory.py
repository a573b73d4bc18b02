"""The fleet's directory in Redis: which nodes are alive, which hold each blob or are
receiving it, which one node fetches a cold blob from the upstream, and from whom
every other node should stream it, so that a blob crosses the upstream link once
for the whole fleet and no node feeds more than `fanout` others.

Everything is decided inside Redis by small Lua scripts, each atomic: two nodes
asking at the same moment get different answers, and exactly one of them wins the
fetch (a `SET` whose key expires). Keys, under `proxyd:fleet:`:

    node:<url>                the node's boot id; expires after `ttl` unless the
                              node's heartbeat (every third of it) renews it
    blob:<digest>:fetch       "<url> <boot>" of the node fetching from the upstream;
                              expires after `ttl` unless that node renews it
    blob:<digest>:held        hash url -> boot of nodes whose store holds the blob
    blob:<digest>:load        hash url -> "<depth> <load> <boot>": every source of the
                              blob (holding or receiving it), its depth in the tree
                              (0: the fetcher or a holder) and the peers it feeds
    blob:<digest>:tree        sorted set of the sources with room for one more peer,
                              shallowest first, then least loaded

An entry counts only while `node:<url>` holds the same boot id: a node that dies
stops counting within `ttl` seconds, and one restarted (a new boot id) is not taken
for what it held before. Dead entries are dropped when a script meets them.

The tree, not a star: a node asking for a blob is sent to the shallowest source with
room, and becomes a source itself one level deeper, so `n` nodes form a tree of depth
about log_fanout(n) and no node streams one blob to more than `fanout` peers (the
serving node enforces the same bound, `proxyd.peergate`). The node that asked tells
the directory when it is done with that peer (`done_with`), freeing the place.

Every call goes through `FleetRedis`: bounded in time, and Redis unreachable is the
answer `ALONE` (or nothing recorded), never an error: the node then fetches as a
proxyd without a fleet does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import structlog

from proxyd.background import stop_loop
from proxyd.fleetredis import FleetRedis, RedisUnreachable
from proxyd.reference import Digest

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("proxyd.fleet")

PREFIX = "proxyd:fleet:"
HELD_FOR = 86400.0  # seconds a blob's holders stay listed without a new holder
TREE_TTLS = 12  # a blob's tree lives this many `ttl` past its last change

_COMMON = """
local SPAN = 1048576
local function alive(nodes, url, b)
  return redis.call('GET', nodes .. url) == b
end
local function entry(load, url)
  local e = redis.call('HGET', load, url)
  if not e then return nil end
  local d, l, b = string.match(e, '^(%d+) (%d+) (.+)$')
  return tonumber(d), tonumber(l), b
end
local function put(tree, load, fanout, url, d, l, b)
  redis.call('HSET', load, url, d .. ' ' .. l .. ' ' .. b)
  if l < fanout then
    redis.call('ZADD', tree, d * SPAN + l, url)
  else
    redis.call('ZREM', tree, url)
  end
end
"""

# KEYS tree load held fetch; ARGV me boot fanout ttl_ms keep_ms node_prefix avoid...
_SOURCE = (
    _COMMON
    + """
local tree, load, held, fetch = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local me, boot = ARGV[1], ARGV[2]
local fanout, ttl, keep = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local nodes = ARGV[6]
local avoid = {}
for i = 7, #ARGV do avoid[ARGV[i]] = true end

local function forget(url)
  redis.call('HDEL', load, url)
  redis.call('ZREM', tree, url)
  redis.call('HDEL', held, url)
end

local function join(d)
  local _, l = entry(load, me)
  put(tree, load, fanout, me, d, l or 0, boot)
  redis.call('PEXPIRE', tree, keep)
  redis.call('PEXPIRE', load, keep)
end

local function pick()
  for _, url in ipairs(redis.call('ZRANGE', tree, 0, 63)) do
    if url ~= me and not avoid[url] then
      local d, l, b = entry(load, url)
      if d == nil then
        redis.call('ZREM', tree, url)
      elseif not alive(nodes, url, b) then
        forget(url)
      else
        return url, d, l, b
      end
    end
  end
  return nil
end

local function seed()
  local sample = redis.call('HRANDFIELD', held, 16, 'WITHVALUES')
  for i = 1, #sample, 2 do
    local url, b = sample[i], sample[i + 1]
    if not alive(nodes, url, b) then
      redis.call('HDEL', held, url)
    elseif url ~= me and redis.call('HEXISTS', load, url) == 0 then
      put(tree, load, fanout, url, 0, 0, b)
    end
  end
end

local url, d, l, b = pick()
if url == nil then
  seed()
  url, d, l, b = pick()
end
if url ~= nil then
  put(tree, load, fanout, url, d, l + 1, b)
  join(d + 1)
  return {'peer', url, d + 1}
end

local claim = redis.call('GET', fetch)
if claim then
  local f, fb = string.match(claim, '^(%S+) (.+)$')
  if f == me and fb == boot then
    join(0)
    return {'fetch', '', 0}
  end
  if alive(nodes, f, fb) then
    if avoid[f] then return {'upstream', '', 0} end
    local fd, fl = entry(load, f)
    if fd ~= nil then put(tree, load, fanout, f, fd, fl + 1, fb) end
    join(1)
    return {'peer', f, 1}
  end
  redis.call('DEL', fetch)
  forget(f)
end
redis.call('SET', fetch, me .. ' ' .. boot, 'PX', ttl)
join(0)
return {'fetch', '', 0}
"""
)

# KEYS tree load held fetch; ARGV me boot fanout keep_ms held_ms
_HOLD = (
    _COMMON
    + """
local tree, load, held, fetch = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local me, boot, fanout = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('HSET', held, me, boot)
redis.call('PEXPIRE', held, ARGV[5])
if redis.call('HEXISTS', load, me) == 0 then
  put(tree, load, fanout, me, 0, 0, boot)
end
redis.call('PEXPIRE', tree, ARGV[4])
redis.call('PEXPIRE', load, ARGV[4])
if redis.call('GET', fetch) == me .. ' ' .. boot then redis.call('DEL', fetch) end
return 1
"""
)

# KEYS tree load held fetch; ARGV me boot
_DROP = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[4]) == ARGV[1] .. ' ' .. ARGV[2] then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS tree load; ARGV peer fanout
_DONE_WITH = (
    _COMMON
    + """
local d, l, b = entry(KEYS[2], ARGV[1])
if d == nil then return 0 end
put(KEYS[1], KEYS[2], tonumber(ARGV[2]), ARGV[1], d, math.max(l - 1, 0), b)
return 1
"""
)

# KEYS fetch tree load; ARGV me boot ttl_ms keep_ms
_RENEW_FETCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] .. ' ' .. ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return 1
"""

# KEYS node; ARGV boot
_LEAVE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Kind = Literal["fetch", "peer", "upstream", "alone"]


@dataclass(frozen=True)
class Source:
    """Where this node should take a blob from.

    - `fetch`: this node won the fetch from the upstream; it keeps the right with
      `fetching`, and ends with `holding` (stored) or `dropped` (failed);
    - `peer`: stream it from `peer`, then `done_with(digest, peer)`; meanwhile this
      node is a source itself, at `depth`, and ends with `holding` or `dropped`;
    - `upstream`: fetch it from the upstream without the right (the peers that could
      send it were avoided);
    - `alone`: Redis is unreachable: fetch as a proxyd without a fleet.
    """

    kind: Kind
    peer: str | None = None
    depth: int = 0


ALONE = Source("alone")


class Directory:
    """One node's view of the directory: `me` is its advertised URL."""

    def __init__(self, redis: FleetRedis, *, me: str, fanout: int, ttl: float) -> None:
        self.redis = redis
        self.me = me
        self.fanout = fanout
        self.ttl = ttl
        self.boot = secrets.token_hex(8)  # this process: a restart is another node
        self._source = redis.script(_SOURCE)
        self._hold = redis.script(_HOLD)
        self._drop = redis.script(_DROP)
        self._done_with = redis.script(_DONE_WITH)
        self._renew_fetch = redis.script(_RENEW_FETCH)
        self._leave = redis.script(_LEAVE)
        self._heartbeat: asyncio.Task[None] | None = None

    # -- this node's liveness ----------------------------------------------------------

    @property
    def every(self) -> float:
        """Seconds between renewals: a third of the TTL, so two may fail in a row."""
        return self.ttl / 3

    def start(self) -> None:
        self._heartbeat = asyncio.create_task(self._beat_forever())

    async def stop(self) -> None:
        """Stop renewing, and leave: peers stop counting on this node at once."""
        await stop_loop(self._heartbeat)
        with contextlib.suppress(RedisUnreachable):
            await self.redis.run_script("leave", self._leave, [node_key(self.me)], [self.boot])

    async def heartbeat(self) -> bool:
        """Renew this node's liveness; False when Redis is unreachable."""
        try:
            await self.redis.call(
                "heartbeat", lambda r: r.set(node_key(self.me), self.boot, px=_ms(self.ttl))
            )
        except RedisUnreachable:
            return False
        return True

    async def _beat_forever(self) -> None:
        while True:
            await self.heartbeat()
            await asyncio.sleep(self.every)

    # -- a blob ------------------------------------------------------------------------

    async def source(self, digest: Digest, avoid: Iterable[str] = ()) -> Source:
        """Where to take `digest` from (see `Source`); never one of `avoid` (peers that
        failed this node for it)."""
        args = [self.me, self.boot, self.fanout, _ms(self.ttl), self._keep_ms]
        args += [node_key(""), *avoid]
        sources = self.redis.metrics.fleet_sources
        try:
            kind, peer, depth = await self.redis.run_script(
                "source", self._source, blob_keys(digest), args
            )
        except RedisUnreachable:
            sources.labels("alone").inc()
            return ALONE
        name, url = _text(kind), _text(peer)
        if name not in ("fetch", "peer", "upstream"):
            raise AssertionError(f"the source script answered {name!r}")
        sources.labels(name).inc()
        return Source(name, url or None, int(depth))  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def fetching(self, digest: Digest) -> AsyncIterator[None]:
        """While the block runs, renew this node's right to fetch `digest` (won from
        `source`), so that it expires only if this node dies."""
        task = asyncio.create_task(self._renew_forever(digest))
        try:
            yield
        finally:
            await stop_loop(task)

    async def _renew_forever(self, digest: Digest) -> None:
        keys = blob_keys(digest)
        args = [self.me, self.boot, _ms(self.ttl), self._keep_ms]
        while True:
            await asyncio.sleep(self.every)
            with contextlib.suppress(RedisUnreachable):
                await self.redis.run_script(
                    "renew_fetch", self._renew_fetch, [keys[3], keys[0], keys[1]], args
                )

    async def holding(self, digest: Digest) -> None:
        """`digest` is in this node's store: peers may take it from here. Ends this
        node's fetch of it, if it had the right."""
        args = [self.me, self.boot, self.fanout, self._keep_ms, _ms(HELD_FOR)]
        with contextlib.suppress(RedisUnreachable):
            await self.redis.run_script("hold", self._hold, blob_keys(digest), args)

    async def dropped(self, digest: Digest) -> None:
        """This node has `digest` no more (its download failed, or it was evicted):
        no peer is sent here for it, and its fetch, if it had the right, is free."""
        with contextlib.suppress(RedisUnreachable):
            await self.redis.run_script("drop", self._drop, blob_keys(digest), [self.me, self.boot])

    async def done_with(self, digest: Digest, peer: str) -> None:
        """This node no longer streams `digest` from `peer`: its place is free."""
        keys = blob_keys(digest)[:2]
        with contextlib.suppress(RedisUnreachable):
            await self.redis.run_script("done_with", self._done_with, keys, [peer, self.fanout])

    async def some_holders(self, digest: Digest, count: int) -> list[str]:
        """At most `count` live nodes holding `digest`, picked at random (so no holder
        takes every request): two Redis round trips however many hold it (empty when
        Redis is unreachable)."""

        async def read(client: Redis) -> list[str]:
            held = blob_keys(digest)[2]
            sample = cast("list[bytes]", await client.hrandfield(held, count, withvalues=True))
            urls, boots = [_text(u) for u in sample[::2]], sample[1::2]
            if not urls:
                return []
            now = await client.mget([node_key(url) for url in urls])
            return [url for url, boot, live in zip(urls, boots, now, strict=True) if live == boot]

        try:
            return await self.redis.call("holders", read)
        except RedisUnreachable:
            return []

    @property
    def _keep_ms(self) -> int:
        return _ms(self.ttl * TREE_TTLS)


def node_key(url: str) -> str:
    return f"{PREFIX}node:{url}"


def blob_keys(digest: Digest) -> list[str]:
    """tree, load, held, fetch: the keys of one blob, in the scripts' order."""
    base = f"{PREFIX}blob:{digest}:"
    return [base + "tree", base + "load", base + "held", base + "fetch"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
