"""Workload 8: a fleet of nodes pulling one cold image at once over one shared link.

``fleet_nodes`` nodes (16; the smoke: 3) pull the same image at the same moment, each
with its own ``skopeo copy docker://NODE/bench/fleet:v1 dir:…``, from the plain
upstream (distribution 2.8) behind a relay that paces the response bodies of all
its connections together at ``fleet_rate`` (32 MiB/s: a WAN link the nodes share)
and counts their bytes. The image is its own (1 + 16 + 64 + 256 MiB layers), pushed
when the workload starts. Three targets, one after the other in the same run:

- ``proxyd``: 16 proxyds forming a fleet: one real ``redis-server``, a ``[cluster]``
  table on each with a shared secret file and ``fanout`` 4 (proxyd's default);
- ``proxyd standalone``: 16 proxyds without ``[cluster]``;
- ``distribution``: 16 distribution proxies (``proxy.remoteurl``), when among
  ``--proxies``.

For each, measured on fresh nodes with empty caches (each awake: ``Context.warm_up``):

- one node of that kind pulling alone through the same relay (``alone``), then the
  crowd: its sample is the slowest node's wall time;
- the bytes of response bodies the relay carried during the crowd's pull, over the
  image's size (manifest, config and layers): 1.0 when the image crossed the link once
  for the whole fleet, 16 when every node fetched it itself;
- the requests the relay carried during the crowd's pull, by kind: blob GETs (the
  image has ``1 + layers`` blobs: once each for the whole fleet is the goal), the
  manifest GETs (each node resolves the tag itself), the blob HEADs (a repository's
  confirmation, which each node of a fleet asks the upstream itself);
- for the fleet, the Redis commands the crowd's pull cost (``INFO commandstats``,
  reset before it), the nodes' heartbeats included;
- the CPU seconds of every node, of the skopeos, the relay, the registry and Redis,
  and the machine's busy time, over each pull (``bench.cpu``), and from each proxyd's
  metrics its part in the fleet (blobs it fetched for the fleet, bytes from and to
  its peers): where the two CPUs went.

The machine's floor, in the same run: the ``machine floor`` row is as many
standalone proxyds that each hold the image already (one store primed by ``proxyd
prefetch``, then hard-linked into each node's own), pulled from by as many skopeos at
once through a relay that only counts (no link, no blob fetched: checked). No fleet
can do better on this machine: the skopeos' hashing and writing and the nodes'
serving are all there is. Each row's slowest node is also given over max(alone,
floor). ``proxyd, 4 nodes`` is a fleet of ``fleet_few_nodes`` on the same link,
beside its own floor of as many warm nodes (one alone: the big fleet's): how the
ratio moves with the nodes each CPU runs.

``direct`` is one skopeo pulling straight through the relay, alone. Sixteen skopeos,
sixteen nodes, the registry and the relay all share the machine's two CPUs: the wall
times are this machine's, which docs/scale.md says when it extrapolates from them.
Every node's copy must hold the manifest and blobs of the image (skopeo verifies each
blob's digest as it copies; the first node's copy is hashed again here).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench import fixtures
from bench.context import Context
from bench.cpu import CpuMeter
from bench.procs import listening_pid
from bench.proxies import DistributionProxy, Proxy, Proxyd, RunningProxy, running
from bench.results import DIRECT, Row, Workload, record
from bench.upstreams import RelayProcess, Upstream
from tests.peers import LOOPBACK, PeerError, http_request
from tests.peers.clients import Skopeo, read_dir_image
from tests.peers.image import BuiltImage
from tests.peers.redisserver import RedisServer

REPOSITORY = "bench/fleet"
FANOUT = 4  # proxyd's default [cluster] fanout
FLEET, STANDALONE, DISTRIBUTION = "proxyd", "proxyd standalone", "distribution"
FLOOR = "machine floor"
STARTERS = 4  # nodes started at once: more only queue for the same two CPUs
PROFILED = 2  # fleet nodes py-spy watches with --profile (more would weigh on the CPUs)
MIB, GIB = 1024 * 1024, 1024 * 1024 * 1024


def fleet(ctx: Context) -> Workload:
    profile = ctx.profile
    n, few, rate = profile.fleet_nodes, profile.fleet_few_nodes, profile.fleet_rate / MIB
    sizes = "+".join(_mib(s) for s in profile.fleet_layer_sizes)
    wl = Workload(
        "fleet",
        f"{n} nodes pulling one cold image ({sizes} MiB) over a {rate:g} MiB/s link",
        "s",
        "lower",
    )
    wl.notes.append(
        f"direct: one skopeo through the link, alone; a target's sample is its slowest of {n}"
    )
    with contextlib.ExitStack() as stack:
        image = _push_image(ctx)
        size = image_bytes(image)
        link = RelayProcess(
            ctx.workdir / "fleet-link", ctx.upstreams.plain.url, total_rate=rate * MIB
        )
        stack.callback(link.stop)
        upstream = Upstream("fleet-link", link.url, relay=link)
        # The floor's nodes are primed through a relay that only counts: no link.
        unpaced = RelayProcess(ctx.workdir / "fleet-floor-link", ctx.upstreams.plain.url)
        stack.callback(unpaced.stop)
        redis = RedisServer(ctx.workdir / "fleet-redis")
        stack.callback(redis.stop)
        redis.start()
        secret = ctx.workdir / "fleet-secret"
        secret.write_text(secrets.token_hex(32) + "\n")
        cluster = {"redis_url": redis.url, "secret_file": str(secret), "fanout": FANOUT}
        chosen = {p.name for p in ctx.proxies}
        targets: list[tuple[str, Proxy, str]] = [
            (FLEET, Proxyd(cluster=cluster), f"a fleet: one Redis, fanout {FANOUT}"),
            (STANDALONE, Proxyd(), "no [cluster]"),
            (DISTRIBUTION, DistributionProxy(), "proxy.remoteurl"),
        ]
        run = Run(ctx, image, upstream, size)
        run.others = {
            "relay": listening_pid(link.port),
            "registry": listening_pid(ctx.upstreams.plain_registry.port),
            "redis": listening_pid(redis.port),
        }
        direct = wl.row(DIRECT)
        direct.extra["about"] = "one skopeo through the link"
        value = record(
            direct, run.pull, ctx.workdir / "fleet-direct", link.url.removeprefix("http://")
        )
        if value is not None:
            direct.samples.append(value)
        floor = _floor(wl, run, Upstream("fleet-floor", unpaced.url, relay=unpaced))
        for name, proxy, about in targets:
            row = wl.row(name)
            row.extra |= {"about": about, "image_bytes": size}
            if name == DISTRIBUTION and name not in chosen:
                row.status, row.reason = "skipped", "not among --proxies"
                continue
            if (reason := proxy.unavailable()) is not None:
                row.status, row.reason = "skipped", reason
                continue
            fresh = redis if name == FLEET else None
            alone = record(row, run.alone, row, proxy, fresh)
            if alone is None:
                continue
            row.extra["alone"] = [alone]
            record(row, run.crowd, row, proxy, fresh, n)
            if floor.floor is not None:
                row.extra["floor"] = [floor.floor]
            if name == FLEET and 1 < few < n:
                _few(wl, run, floor, row, proxy, redis, few)
    return wl


class _Floor:
    """The machine's floor: a store primed once, and the slowest of ``nodes`` warm
    nodes pulling from it at once (measured on demand, for each size of crowd)."""

    def __init__(self, row: Row, upstream: Upstream) -> None:
        self.row = row
        self.upstream = upstream
        self.seed: Path | None = None
        self.floor: float | None = None  # for the workload's nodes


def _floor(wl: Workload, run: Run, upstream: Upstream) -> _Floor:
    """The floor row: every node already holds the image (its store a copy of one
    primed store), no link in the way: what any fleet at best does on this machine."""
    n = run.ctx.profile.fleet_nodes
    floor = _Floor(wl.row(FLOOR), upstream)
    floor.row.extra["about"] = f"{n} warm proxyds, no link: each holds the image already"
    floor.seed = record(floor.row, run.prime, upstream)
    if floor.seed is not None:
        floor.floor = record(floor.row, run.floor, floor.row, upstream, floor.seed, n)
        if floor.floor is not None:
            floor.row.samples.append(floor.floor)
    return floor


def _few(
    wl: Workload,
    run: Run,
    floor: _Floor,
    fleet_row: Row,
    proxy: Proxy,
    redis: RedisServer,
    few: int,
) -> None:
    """A fleet of ``few`` nodes on the same link, beside its own floor (``few`` warm
    nodes): how the ratio moves with the nodes each CPU runs. One alone is the big
    fleet's own (the same kind of node, the same link)."""
    row = wl.row(f"{FLEET}, {few} nodes")
    row.extra |= {
        "about": f"a fleet of {few} on the same link",
        "image_bytes": run.size,
        "alone": fleet_row.extra["alone"],
    }
    if floor.seed is not None:
        scratch = Row(FLOOR)
        few_floor = record(scratch, run.floor, scratch, floor.upstream, floor.seed, few)
        if few_floor is not None:
            row.extra |= {"floor": [few_floor], "floor_nodes": scratch.extra["nodes"]}
            row.extra["floor_cpu"] = scratch.extra.get("cpu")
    record(row, run.crowd, row, proxy, redis, few)


class Run:
    """The measurements of one workload: the image, the link, the work directory."""

    def __init__(self, ctx: Context, image: BuiltImage, upstream: Upstream, size: int) -> None:
        self.ctx = ctx
        self.image = image
        self.upstream = upstream
        self.size = size
        self.timeout = ctx.profile.fleet_timeout()
        self.others: dict[str, int] = {}  # the relay, the registry, Redis: their CPU too
        self._starts = 0

    def _dir(self, label: str) -> Path:
        self._starts += 1
        return self.ctx.workdir / "fleet" / f"{label}-{self._starts}"

    def alone(self, row: Row, proxy: Proxy, redis: RedisServer | None) -> float:
        """One node of ``proxy``'s kind pulling the image alone (a fleet of one)."""
        _flush(redis)
        with running(proxy, self.upstream, self._dir(proxy.name)) as node:
            self.ctx.warm_up(node.url)
            with CpuMeter({"node 0": node.pid} | self.others) as cpu:
                elapsed = self.pull(self._dir("pull"), node.host, check=True)
            row.extra["alone_cpu"] = cpu.to_json() | {"nodes": _per_node(cpu, [node], self.size)}
            return elapsed

    def crowd(self, row: Row, proxy: Proxy, redis: RedisServer | None, n: int) -> None:
        """Every node at once; the slowest node's time is the sample."""
        relay = self.upstream.relay
        assert relay is not None
        _flush(redis)
        with self._nodes(proxy, self.upstream, n) as nodes:
            before, counts = relay.body_bytes(), relay.counts()
            if redis is not None:
                redis.command("CONFIG", "RESETSTAT")
            watched = nodes[:PROFILED] if row.target == FLEET else []
            with contextlib.ExitStack() as profiles:
                for i, node in enumerate(watched):
                    profiles.enter_context(self.ctx.watch(node, f"fleet-{n}-node{i}"))
                times = self._measured_pull(row, nodes)
            row.extra["upstream_bytes"] = [relay.body_bytes() - before]
            asked = _requests(relay.counts(), counts)
            row.extra["upstream_requests"] = asked
            row.extra["blob_gets"] = [asked.get("GET blobs", 0)]
            if redis is not None:
                calls = redis_calls(redis.port)
                row.extra["redis_calls"] = calls
                row.extra["redis_ops"] = [sum(calls.values())]
        row.samples.append(max(times))

    def prime(self, upstream: Upstream) -> Path:
        """A proxyd's store holding the image (``proxyd prefetch`` through
        ``upstream``), for the floor's nodes to copy."""
        workdir = self._dir("primed")
        node = Proxyd().start(upstream, workdir)
        try:
            assert node.prefetch is not None and node.cache_dir is not None
            node.prefetch(f"{REPOSITORY}:{self.image.tag}")
        finally:
            node.stop()
        return node.cache_dir

    def floor(self, row: Row, upstream: Upstream, seed: Path, n: int) -> float:
        """The slowest of ``n`` standalone proxyds that each hold the image already
        (their stores copies of ``seed``), pulled from at once: no node fetches."""
        relay = upstream.relay
        assert relay is not None
        with self._nodes(Proxyd(), upstream, n, seed=seed) as nodes:
            counts = relay.counts()
            pids = self.others | {"relay": listening_pid(relay.port)}
            times = self._measured_pull(row, nodes, others=pids)
            if (fetched := _requests(relay.counts(), counts).get("GET blobs", 0)) > 0:
                raise PeerError(f"the floor's nodes were not warm: {fetched} blob GETs upstream")
        return max(times)

    def _measured_pull(
        self, row: Row, nodes: list[RunningProxy], others: dict[str, int] | None = None
    ) -> list[float]:
        """`_pull_all`, with the CPU each process spent meanwhile (``bench.cpu``)."""
        pids = {f"node {i}": node.pid for i, node in enumerate(nodes)}
        with CpuMeter(pids | (self.others if others is None else others)) as cpu:
            times = self._pull_all([node.host for node in nodes])
        row.extra["nodes"] = [round(t, 3) for t in times]
        row.extra["cpu"] = cpu.to_json() | {"nodes": _per_node(cpu, nodes, self.size)}
        return times

    @contextlib.contextmanager
    def _nodes(
        self, proxy: Proxy, upstream: Upstream, n: int, *, seed: Path | None = None
    ) -> Iterator[list[RunningProxy]]:
        """``n`` fresh nodes, each awake, their stores empty or copies of ``seed``; all
        stopped (and their caches removed) after."""
        with contextlib.ExitStack() as stack:
            dirs = [self._dir(proxy.name) for _ in range(n)]
            lock = threading.Lock()

            def start(workdir: Path) -> RunningProxy:
                if seed is not None:
                    copy_store(seed, workdir / "cache")
                node = proxy.start(upstream, workdir)
                with lock:  # whatever else fails, this one is stopped
                    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
                    stack.callback(node.stop)
                try:
                    self.ctx.warm_up(node.url)
                except OSError as exc:  # a node that started, then went away: its log says why
                    raise PeerError(
                        f"{node.host} ({workdir.name}): {exc}\n{_tail(workdir)}"
                    ) from None
                return node

            with concurrent.futures.ThreadPoolExecutor(STARTERS) as pool:
                nodes = list(pool.map(start, dirs))
            yield nodes

    def _pull_all(self, hosts: list[str]) -> list[float]:
        """Each host pulled by its own skopeo, all released at the same moment."""
        gate = threading.Barrier(len(hosts))
        dests = [self._dir("pull") for _ in hosts]

        def pull(i: int) -> float:
            gate.wait(timeout=60)
            return self.pull(dests[i], hosts[i], check=i == 0)

        with concurrent.futures.ThreadPoolExecutor(len(hosts)) as pool:
            return list(pool.map(pull, range(len(hosts))))

    def pull(self, dest: Path, host: str, *, check: bool = False) -> float:
        """Seconds ``skopeo copy`` of the image from ``host`` took; its copy checked:
        the manifest, every blob present (``check``: hashed again), then removed."""
        skopeo = Skopeo(dest / "skopeo")
        image_dir = dest / "image"
        image_dir.mkdir(parents=True)
        try:
            started = time.perf_counter()
            skopeo.copy(
                f"docker://{host}/{REPOSITORY}:{self.image.tag}",
                f"dir:{image_dir}",
                timeout=self.timeout,
            )
            elapsed = time.perf_counter() - started
            _check(self.image, image_dir, hashed=check)
            return elapsed
        finally:
            shutil.rmtree(dest, ignore_errors=True)


def copy_store(seed: Path, cache: Path) -> None:
    """A node's own store, a copy of ``seed``: its blobs hard links (never written
    again: stored blobs are only read, renamed over or removed), the rest copied (the
    SQLite file of tag records is each node's to write)."""
    blobs = seed / "blobs"

    def copy(src: str, dst: str) -> object:
        if Path(src).is_relative_to(blobs):
            os.link(src, dst)
            return dst
        return shutil.copy2(src, dst)

    def ignore(directory: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(directory) == seed else []  # its files being written: its own

    shutil.copytree(seed, cache, copy_function=copy, ignore=ignore)


def _per_node(cpu: CpuMeter, nodes: list[RunningProxy], size: int) -> list[dict[str, object]]:
    """Each node's CPU seconds (and per GiB its client pulled), and for proxyd its
    part in the fleet from its metrics: blobs it fetched for the fleet, bytes from
    and to its peers."""
    out = []
    for i, node in enumerate(nodes):
        seconds = cpu.seconds.get(f"node {i}", 0.0)
        entry: dict[str, object] = {
            "host": node.host,
            "cpu": round(seconds, 2),
            "cpu_per_gib": round(seconds / (size / GIB), 2),
        }
        if node.name == Proxyd.name:
            entry |= node_metrics(node.url)
        out.append(entry)
    return out


def node_metrics(url: str) -> dict[str, object]:
    """A proxyd's part in the fleet, from its ``/metrics`` (`fleet_part`)."""
    return fleet_part(http_request("GET", f"{url}/metrics", timeout=10).body.decode())


def fleet_part(metrics: str) -> dict[str, object]:
    """From a proxyd's metrics: where the directory sent it (blobs by source) and the
    bytes it took from and sent to its peers."""
    sources: dict[str, int] = {}
    found: dict[str, object] = {"sources": sources, "peer_in": 0, "peer_out": 0}
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("proxyd_fleet_sources_total{"):
            sources[name.partition('source="')[2].partition('"')[0]] = int(float(value))
        elif name == "proxyd_peer_received_bytes_total":
            found["peer_in"] = int(float(value))
        elif name == "proxyd_peer_sent_bytes_total":
            found["peer_out"] = int(float(value))
    return found


def _tail(workdir: Path, chars: int = 400) -> str:
    """The end of what a node wrote (proxyd's stderr, distribution's logs)."""
    logs = sorted(p for p in workdir.glob("*") if p.suffix in (".stderr", ".log") and p.is_file())
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


def _check(image: BuiltImage, image_dir: Path, *, hashed: bool) -> None:
    if hashed:
        pulled = read_dir_image(image_dir)
        manifest_ok = pulled.manifest_digest == image.manifest_digest
        blobs = set(pulled.blob_digests)
    else:
        manifest_ok = (image_dir / "manifest.json").read_bytes() == image.manifest
        blobs = {f"sha256:{p.name}" for p in image_dir.iterdir() if len(p.name) == 64}
    if not manifest_ok:
        raise PeerError(f"{image_dir}: another manifest than the image's")
    if blobs != set(image.blob_digests):
        raise PeerError(f"{image_dir}: other blobs than the image's: {sorted(blobs)}")


def _push_image(ctx: Context) -> BuiltImage:
    sizes = list(ctx.profile.fleet_layer_sizes)
    print(f"   building and pushing the fleet's image ({sum(sizes) >> 20} MiB)", flush=True)
    image = fixtures.build_image(ctx.workdir / "fleet-image", sizes, seed=7)
    fixtures.push(ctx.skopeo, image, ctx.upstreams.plain.host, REPOSITORY, None)
    shutil.rmtree(image.layout, ignore_errors=True)  # the upstream holds it now
    return image


def image_bytes(image: BuiltImage) -> int:
    """What a pull of ``image`` takes from its upstream: manifest, config and layers."""
    manifest = json.loads(image.manifest)
    blobs = [manifest["config"], *manifest["layers"]]
    return len(image.manifest) + sum(int(b["size"]) for b in blobs)


def _requests(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """The requests relayed between two readings, by method and kind of path
    (``GET blobs``, ``HEAD blobs``, ``GET manifests``...)."""
    kinds: dict[str, int] = {}
    for key, n in after.items():
        method, _, path = key.partition(" ")
        kind = next((k for k in ("blobs", "manifests", "token") if f"/{k}" in path), "other")
        name = f"{method} {kind}"
        kinds[name] = kinds.get(name, 0) + n - before.get(key, 0)
    return {k: n for k, n in sorted(kinds.items()) if n}


def _flush(redis: RedisServer | None) -> None:
    """An empty directory: no node of an earlier measurement is remembered."""
    if redis is not None and redis.command("FLUSHALL") != "+OK":
        raise PeerError("redis-server: FLUSHALL failed")


def redis_calls(port: int, timeout: float = 5.0) -> dict[str, int]:
    """``INFO commandstats``: calls per command since the last ``CONFIG RESETSTAT``,
    without the benchmark's own (INFO, CONFIG)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        reply = b""
        while b"\r\n" not in reply:
            reply += sock.recv(4096) or b"!"
            if reply.endswith(b"!"):
                raise PeerError("redis-server closed the connection")
        head, _, body = reply.partition(b"\r\n")
        length = int(head[1:])
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise PeerError("redis-server closed the connection")
            body += chunk
    calls = {}
    for line in body[:length].decode().splitlines():
        name, _, stats = line.partition(":")
        if not name.startswith("cmdstat_"):
            continue
        command = name.removeprefix("cmdstat_")
        fields = dict(part.split("=", 1) for part in stats.split(","))
        if command.split("|", 1)[0] not in ("info", "config"):
            calls[command] = int(fields["calls"])
    return calls


def _mib(size: int) -> str:
    return f"{size / MIB:g}"
