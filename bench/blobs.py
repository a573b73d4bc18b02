"""Workloads 3 and 4: one cold blob from an upstream that sends slowly.

3. Time to first byte of a cold blob from the ``slow`` upstream (a relay pacing the
   body at ``slow_rate``): a proxy that streams answers about as fast as the
   upstream does; one that buffers the blob first answers after size / rate seconds.
   The ``one hop`` row goes through a relay that only splices bytes (``hop``): what a
   process that does little but stand between client and upstream costs on this
   machine, for scale. Each sample is a few milliseconds that vary 2-3x from one to
   the next, so it takes ``ttfb_reps`` of them (31) for the median to settle; a
   target that buffers (every sample over a second: drayage takes 16 s each) stops
   after ``BUFFERED_SAMPLES``, when its verdict is plain and more would only add
   minutes.
4. ``crowd_clients`` concurrent cold GETs of one blob through a proxy in front of
   the ``crowd`` upstream (paced at ``crowd_rate`` per connection). The relay counts
   the GETs it received: a proxy that shares one download sends exactly one. The
   wall time is compared with a single GET straight from that upstream.
"""

from __future__ import annotations

from typing import Any

from bench.clients import Fetched, fetch_many, fetch_one, ttfb
from bench.context import Context, shuffled
from bench.proxies import Proxy
from bench.report import X
from bench.results import DIRECT, ONE_HOP, Row, Workload, record
from bench.upstreams import Upstream

MS = 1000.0
BUFFERING_MS = 1000.0  # a first byte this late: the target waited for most of the blob
BUFFERED_SAMPLES = 5


def _sample(row: Row, measure: Any, *args: Any, **kwargs: Any) -> None:
    """One measurement in seconds, kept in ms (a failure marks the row instead)."""
    value = record(row, measure, *args, **kwargs)
    if value is not None:
        row.samples.append(value * MS)


def _buffers(row: Row) -> bool:
    """Enough samples, every one of them late: the target buffers the blob."""
    return len(row.samples) >= BUFFERED_SAMPLES and min(row.samples) > BUFFERING_MS


def time_to_first_byte(ctx: Context) -> Workload:
    upstream = ctx.upstreams.slow
    rate = ctx.profile.slow_rate / (1024 * 1024)
    wl = Workload(
        "cold_ttfb",
        f"cold TTFB, {ctx.blob.size >> 20} MiB blob, upstream at {rate:g} MiB/s",
        "ms",
        "lower",
    )
    hop = wl.row(ONE_HOP)
    hop.extra["about"] = "a relay that only moves bytes"
    proxies = ctx.ready_rows(wl)
    path = ctx.blob_path(ctx.blob.digest)
    timeout = ctx.profile.slow_timeout()
    references = [(wl.row(DIRECT), upstream.url), (hop, ctx.upstreams.hop.url)]
    for rep in range(ctx.profile.ttfb_reps):
        turns: list[tuple[Row, str] | Proxy] = [*references, *proxies]
        for turn in shuffled(turns, rep):
            if isinstance(turn, Proxy):
                if not _buffers(wl.row(turn.name)):
                    for row, running in ctx.each_fresh(wl, [turn], upstream):
                        with ctx.watch(running, f"{wl.id}-{rep}"):
                            _sample(row, ttfb, running.url + path, {}, timeout=timeout)
                continue
            row, url = turn
            if row.status == "ok":
                # As a proxy's measurement follows its warm-up (`ctx.fresh`).
                record(row, ctx.warm_up, url)
                _sample(row, ttfb, url + path, {}, timeout=timeout)
    for proxy in proxies:
        row = wl.row(proxy.name)
        about = []
        if row.median is not None and hop.median:
            about.append(f"{row.median / hop.median:.2f}{X} one hop's")
        if _buffers(row) and len(row.samples) < ctx.profile.ttfb_reps:
            about.append(f"buffers: sampled {len(row.samples)} times")
        if about:
            row.extra["about"] = "; ".join(about)
    return wl


def concurrent_cold(ctx: Context) -> Workload:
    upstream = ctx.upstreams.crowd
    n, size = ctx.profile.crowd_clients, ctx.blob.size
    rate = ctx.profile.crowd_rate / (1024 * 1024)
    wl = Workload(
        "concurrent_cold",
        f"{n} concurrent cold GETs, {size >> 20} MiB blob, upstream at {rate:g} MiB/s",
        "s",
        "lower",
    )
    wl.notes.append(
        f"direct is one GET from the upstream; a proxy row is the wall time of {n} clients"
    )
    proxies = ctx.ready_rows(wl)
    path = ctx.blob_path(ctx.blob.digest)
    timeout = ctx.profile.crowd_timeout()
    direct = wl.row(DIRECT)
    for rep in range(ctx.profile.reps):
        for proxy in shuffled([None, *proxies], rep):  # None: direct
            if proxy is None:
                if direct.status == "ok":
                    fetched = record(direct, fetch_one, upstream.url + path, {}, timeout=timeout)
                    if fetched is not None and _complete(direct, fetched, 1, size):
                        direct.samples.append(fetched.seconds)
                continue
            _crowd_turn(ctx, wl, proxy, upstream, path, rep)
    return wl


def _crowd_turn(
    ctx: Context, wl: Workload, proxy: Proxy, upstream: Upstream, path: str, rep: int
) -> None:
    relay = upstream.relay
    assert relay is not None
    n, size, timeout = ctx.profile.crowd_clients, ctx.blob.size, ctx.profile.crowd_timeout()
    for row, running in ctx.each_fresh(wl, [proxy], upstream):
        before = relay.gets(ctx.blob.digest)
        with ctx.watch(running, f"{wl.id}-{rep}"):
            fetched = record(row, fetch_many, running.url + path, n, {}, timeout=timeout)
        after = relay.gets(ctx.blob.digest)
        if fetched is not None and _complete(row, fetched, n, size):
            row.samples.append(fetched.seconds)
            row.extra.setdefault("upstream_gets", []).append(after - before)


def _complete(row: Row, fetched: Fetched, n: int, size: int) -> bool:
    """Every client got a 200 and the whole blob; otherwise the row is an error."""
    pairs = zip(fetched.statuses, fetched.sizes, strict=True)
    bad = [(status, got) for status, got in pairs if status != 200 or got != size]
    if len(fetched.statuses) == n and not bad:
        return True
    row.status = "error"
    row.reason = f"{len(bad)} of {n} GETs incomplete, e.g. {bad[:3]} (want 200, {size} B)"
    return False
