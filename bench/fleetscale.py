"""``python -m bench.fleetscale [--nodes 1000 10000] [--fanout 4]``: the fleet's
directory at a size no machine here can run proxyds for (docs/scale.md).

No proxyd and no bytes: ``n`` ``proxyd.directory.Directory`` objects in this one
process (each a node, its own URL and boot id) and the directory's own Lua scripts
on a real ``redis-server`` on 127.0.0.1. For each size:

1. every node renews its liveness once (a heartbeat, as each node does every third of
   ``ttl``);
2. every node asks where to take one cold blob from (``source``), all at once, with
   ``CONCURRENCY`` calls in flight; none has finished, the moment the tree is widest;
3. every node is done with its peer (``done_with``) and holds the blob (``holding``);
4. the fetcher dies (its liveness key deleted, as its expiry would): each node it fed
   asks again without it.

It prints, per size, the Redis commands per node and pull (``INFO commandstats``), the
server's microseconds per script call, the wall time of step 2, the depth of the
tree (deepest node, and how many at each depth), the most peers any source feeds,
the Redis memory of the blob's keys after step 3, and what the fetcher's peers were
told in step 4. Nothing leaves 127.0.0.1; the server is stopped on the way out.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/fleetscale.py``: import as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import collections
import hashlib
import math
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.fleet import redis_calls
from proxyd.directory import Directory, Source, blob_keys, node_key
from proxyd.fleetredis import FleetRedis
from proxyd.metrics import Metrics
from proxyd.reference import Digest
from tests.peers import LOOPBACK
from tests.peers.redisserver import RedisServer

CONCURRENCY = 64  # calls in flight: a burst of nodes asking at once
# Longer than proxyd's default (5 s): one heartbeat must keep 10,000 simulated nodes
# alive through every step. The TTL sets only when entries expire, not what a call
# does; the heartbeats' own rate at the default is nodes / (5 s / 3).
TTL = 600.0


@dataclass
class Figures:
    nodes: int
    fanout: int
    calls: dict[str, dict[str, int]] = field(default_factory=dict)  # step -> command -> calls
    usec_per_script: float = 0.0
    burst_seconds: float = 0.0
    depths: dict[int, int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    most_fed: int = 0
    key_bytes: dict[str, int] = field(default_factory=dict)
    after_fetcher: dict[str, int] = field(default_factory=dict)


async def measure(redis_server: RedisServer, n: int, fanout: int) -> Figures:
    figures = Figures(n, fanout)
    redis_server.command("FLUSHALL")
    redis = FleetRedis(redis_server.url, timeout=30.0, metrics=Metrics())
    nodes = [
        Directory(
            redis,
            me=f"http://10.{i // 250 % 250}.{i % 250}.{i // 62500}:5000",
            fanout=fanout,
            ttl=TTL,
        )
        for i in range(n)
    ]
    digest = Digest.parse("sha256:" + hashlib.sha256(f"blob {n}".encode()).hexdigest())
    gate = asyncio.Semaphore(CONCURRENCY)

    async def each(step: Callable[[Directory], Awaitable[object]]) -> list[object]:
        async def one(node: Directory) -> object:
            async with gate:
                return await step(node)

        return list(await asyncio.gather(*(one(node) for node in nodes)))

    async def stage(name: str, step: Callable[[Directory], Awaitable[object]]) -> list[object]:
        redis_server.command("CONFIG", "RESETSTAT")
        started = time.perf_counter()
        out = await each(step)
        if name == "source":
            figures.burst_seconds = time.perf_counter() - started
            figures.usec_per_script = _usec_per_call(redis_server.port, "evalsha")
        figures.calls[name] = redis_calls(redis_server.port)
        return out

    try:
        await stage("heartbeat", lambda node: node.heartbeat())
        sources = [
            s
            for s in await stage("source", lambda node: node.source(digest))
            if isinstance(s, Source)
        ]
        figures.kinds = dict(collections.Counter(s.kind for s in sources))
        figures.depths = dict(sorted(collections.Counter(s.depth for s in sources).items()))
        figures.most_fed = max(
            collections.Counter(s.peer for s in sources if s.peer).values(), default=0
        )
        by_node = dict(zip((node.me for node in nodes), sources, strict=True))

        async def finish(node: Directory) -> None:
            source = by_node[node.me]
            if source.peer is not None:
                await node.done_with(digest, source.peer)
            await node.holding(digest)

        await stage("done_with + holding", finish)
        for key in blob_keys(digest):
            used = redis_server.command("MEMORY", "USAGE", key)
            if used.startswith(":"):
                figures.key_bytes[key.rsplit(":", 1)[1]] = int(used[1:])
        await _fetcher_dies(redis_server, nodes, by_node, digest, figures)
    finally:
        await redis.close()
    return figures


async def _fetcher_dies(
    redis_server: RedisServer,
    nodes: list[Directory],
    by_node: dict[str, Source],
    digest: Digest,
    figures: Figures,
) -> None:
    """Back to the widest moment (every node receiving, none holding), then the fetcher
    gone: what each node it fed is told, never to take it from the dead node again."""
    for key in blob_keys(digest):
        redis_server.command("DEL", key)
    for node in nodes:
        by_node[node.me] = await node.source(digest)
    fetcher = next(node.me for node in nodes if by_node[node.me].kind == "fetch")
    redis_server.command("DEL", node_key(fetcher))
    fed = [node for node in nodes if by_node[node.me].peer == fetcher]
    answers = [await node.source(digest, avoid=[fetcher]) for node in fed]
    figures.after_fetcher = dict(collections.Counter(_told(a) for a in answers))


def _told(source: Source) -> str:
    return f"{source.kind} at depth {source.depth}" if source.kind == "peer" else source.kind


def _usec_per_call(port: int, command: str) -> float:
    """The server's own microseconds per call of ``command`` (INFO commandstats)."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        data = b""
        deadline = time.monotonic() + 5
        while b"\r\n\r\n" not in data[-8:] and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    for line in data.decode(errors="replace").splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            fields = dict(part.split("=", 1) for part in line.split(":", 1)[1].split(","))
            return float(fields["usec_per_call"])
    return 0.0


def render(figures: Figures) -> str:
    n, fanout = figures.nodes, figures.fanout
    lines = [
        f"{n} nodes, fanout {fanout} (ceil(log_{fanout} {n}) = {math.ceil(math.log(n, fanout))})"
    ]
    for step, calls in figures.calls.items():
        total = sum(calls.values())
        shown = ", ".join(f"{c} {k}" for k, c in sorted(calls.items()))
        lines.append(f"  {step}: {total} Redis commands ({total / n:.2f} per node: {shown})")
    lines.append(
        f"  source, all at once: {figures.burst_seconds:.2f} s for {n} nodes; "
        f"{figures.usec_per_script:.1f} µs of Redis per script call"
    )
    lines.append(f"  answers: {figures.kinds}; depth -> nodes: {figures.depths}")
    lines.append(f"  most peers fed by one source: {figures.most_fed}")
    lines.append(f"  the blob's keys once all hold it (bytes): {figures.key_bytes}")
    lines.append(f"  the fetcher dies: what the nodes it fed are told: {figures.after_fetcher}")
    return "\n".join(lines)


async def run(sizes: list[int], fanout: int) -> None:
    with tempfile.TemporaryDirectory(prefix="proxyd-fleetscale-") as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            for n in sizes:
                print(render(await measure(server, n, fanout)), flush=True)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fleetscale", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[16, 1000, 10000])
    parser.add_argument("--fanout", type=int, default=4)
    args = parser.parse_args(argv)
    asyncio.run(run(args.nodes, args.fanout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
