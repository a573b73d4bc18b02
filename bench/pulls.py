"""Workloads 1, 2 and 10: a whole image pulled with ``skopeo copy docker://… dir:…``.

Warm: every proxy is primed with one pull, then each repetition pulls again
(proxies keep running). Cold: every repetition starts each proxy on an empty cache.
First pull: every repetition starts each proxy on an empty cache twice, once pulled
from as soon as it answers its readiness check (what a restart of the daemon costs
the next pull) and once after the warm-up request the cold pull has (``NAME warmed``).
The direct pull from the same upstream is measured in every repetition too, and the
repetitions interleave the targets so a drift of the machine hits all of them alike.
The first pull of each target is checked blob by blob against the image.
"""

from __future__ import annotations

import contextlib
import shutil
import time

from bench.context import Context, shuffled
from bench.proxies import Proxy, RunningProxy
from bench.report import X
from bench.results import (
    DIRECT,
    WARMED,
    Row,
    Workload,
    first_over_warmed,
    record,
    warmed,
)
from bench.upstreams import Upstream
from tests.peers import PeerError
from tests.peers.clients import read_dir_image


def _pull(ctx: Context, host: str, creds: str | None, *, check: bool) -> float:
    dest = ctx.workdir / "pulls" / f"{host.replace(':', '_')}-{time.monotonic_ns()}"
    dest.mkdir(parents=True)
    try:
        started = time.perf_counter()
        ctx.skopeo.copy(
            f"docker://{host}/{ctx.repository}:{ctx.image.tag}",
            f"dir:{dest}",
            src_creds=creds,
            timeout=ctx.profile.pull_timeout(),
        )
        elapsed = time.perf_counter() - started
        if check:
            pulled = read_dir_image(dest)
            if pulled.blob_digests != frozenset(ctx.image.blob_digests):
                raise PeerError(f"{host} served other blobs than the image's")
            if pulled.manifest_digest != ctx.image.manifest_digest:
                raise PeerError(f"{host} served another manifest")
        return elapsed
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _measure(ctx: Context, row: Row, host: str, creds: str | None) -> None:
    if row.status != "ok":
        return
    value = record(row, _pull, ctx, host, creds, check=not row.samples)
    if value is not None:
        row.samples.append(value)


def warm_pull(ctx: Context, upstream: Upstream) -> Workload:
    wl = Workload(
        f"warm_pull_{upstream.name}", f"warm pull, {upstream.name} upstream", "s", "lower"
    )
    proxies = ctx.ready_rows(wl)
    direct = wl.row(DIRECT)
    with contextlib.ExitStack() as stack:
        started: dict[str, RunningProxy] = {}
        for proxy in proxies:
            row = wl.row(proxy.name)
            running = record(row, stack.enter_context, ctx.fresh(proxy, upstream))
            if running is not None:
                started[proxy.name] = running
                record(row, _pull, ctx, running.host, None, check=True)  # primes the cache
        turns: list[RunningProxy | None] = [None, *started.values()]  # None: direct
        for rep in range(ctx.profile.pull_reps):
            for running in shuffled(turns, rep):
                if running is None:
                    _measure(ctx, direct, upstream.host, upstream.creds_text)
                    continue
                with ctx.watch(running, f"{wl.id}-{rep}"):
                    _measure(ctx, wl.row(running.name), running.host, None)
    return wl


def cold_pull(ctx: Context, upstream: Upstream) -> Workload:
    wl = Workload(
        f"cold_pull_{upstream.name}", f"cold pull, {upstream.name} upstream", "s", "lower"
    )
    proxies = ctx.ready_rows(wl)
    direct = wl.row(DIRECT)
    turns: list[Proxy | None] = [None, *proxies]  # None: direct
    for rep in range(ctx.profile.pull_reps):
        for proxy in shuffled(turns, rep):
            if proxy is None:
                _measure(ctx, direct, upstream.host, upstream.creds_text)
                continue
            for row, running in ctx.each_fresh(wl, [proxy], upstream):
                with ctx.watch(running, f"{wl.id}-{rep}"):
                    _measure(ctx, row, running.host, None)
    return wl


def first_pull(ctx: Context, upstream: Upstream) -> Workload:
    """Each proxy's first pull as soon as it is ready, against its cold pull after the
    warm-up (both on empty caches, interleaved with the direct pull); the note of the
    first-pull row gives its median over the warmed one's."""
    wl = Workload(
        f"first_pull_{upstream.name}",
        f"first pull of a fresh proxy, {upstream.name} upstream",
        "s",
        "lower",
    )
    proxies = ctx.ready_rows(wl, lambda proxy: (proxy.name, warmed(proxy.name)))
    direct = wl.row(DIRECT)
    turns: list[tuple[Proxy, bool] | None] = [None]  # None: direct
    turns += [(proxy, warm) for proxy in proxies for warm in (False, True)]
    for rep in range(ctx.profile.pull_reps):
        for turn in shuffled(turns, rep):
            if turn is None:
                _measure(ctx, direct, upstream.host, upstream.creds_text)
                continue
            proxy, warm = turn
            suffix = WARMED if warm else ""
            for row, running in ctx.each_fresh(wl, [proxy], upstream, warm_up=warm, suffix=suffix):
                with ctx.watch(running, f"{wl.id}-{rep}{suffix.replace(' ', '-')}"):
                    _measure(ctx, row, running.host, None)
    for proxy in proxies:
        ratio = first_over_warmed(wl, proxy.name)
        if ratio is not None:
            wl.rows[proxy.name].extra["about"] = f"{ratio:.2f}{X} warmed"
        wl.rows[warmed(proxy.name)].extra["about"] = "after one HEAD of a missing tag"
    return wl
