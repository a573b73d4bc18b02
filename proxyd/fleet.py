"""This node's part in a fleet of proxyds (`[cluster]`): its one connection to Redis,
its entry in the directory (kept alive by a heartbeat), the gate its peer endpoint
admits peers through, and the client it asks peers with. Built once by the core when
`[cluster]` is set, started and closed in order; without the table there is none
and proxyd works alone.

The directory and the peer client are what a pull uses (`proxyd.fleetpull`, which
the core hands the puller); upload sessions live in Redis through
`proxyd.fleetuploads`.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from proxyd.clustersettings import ClusterSettings
from proxyd.directory import Directory
from proxyd.fleetredis import FleetRedis
from proxyd.metrics import Metrics
from proxyd.peergate import PeerGate
from proxyd.peers import PeerClient

log = structlog.get_logger("proxyd.fleet")


@dataclass
class Fleet:
    settings: ClusterSettings
    redis: FleetRedis
    directory: Directory
    gate: PeerGate
    peers: PeerClient

    @classmethod
    def build(
        cls, settings: ClusterSettings, secret: bytes, *, metrics: Metrics, user_agent: str
    ) -> Fleet:
        redis = FleetRedis(settings.redis_url, timeout=settings.timeout, metrics=metrics)
        directory = Directory(
            redis, me=settings.advertise, fanout=settings.fanout, ttl=settings.ttl
        )
        gate = PeerGate(secret, fanout=settings.fanout, metrics=metrics)
        peers = PeerClient(secret, metrics=metrics, user_agent=user_agent)
        return cls(settings, redis, directory, gate, peers)

    async def start(self) -> None:
        await self.peers.__aenter__()
        joined = await self.directory.heartbeat()
        self.directory.start()
        log.info(
            "fleet.joined" if joined else "fleet.alone",
            advertise=self.settings.advertise,
            redis=self.redis.where,
            fanout=self.settings.fanout,
        )

    async def close(self) -> None:
        """Leave the directory first (peers stop counting on this node), then close."""
        await self.directory.stop()
        await self.peers.close()
        await self.redis.close()
