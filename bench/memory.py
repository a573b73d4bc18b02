"""Workload 6: peak resident memory of each proxy while it streams a cold blob.

Each measurement starts the proxy afresh (``VmHWM`` in /proc/PID/status is the peak
since the process started), reads its idle RSS, streams one cold blob through it to a
client that discards the bytes, and reads the peak. It is done for a small and a
large blob: a proxy whose peak grows with the blob buffers it in memory. There is no
direct row: the upstream is not a proxy.
"""

from __future__ import annotations

import contextlib

from bench.clients import fetch_one
from bench.context import Context
from bench.fixtures import Blob
from bench.procs import memory
from bench.results import Workload, record
from tests.peers import PeerError


def peak_rss(ctx: Context) -> list[Workload]:
    out = []
    for blob in ctx.rss_blobs:
        wl = Workload(
            f"peak_rss_{blob.size >> 20}MiB",
            f"peak RSS streaming a cold {_size(blob.size)} blob",
            "MiB",
            "lower",
            has_direct=False,
        )
        proxies = ctx.ready_rows(wl)
        for rep in range(ctx.profile.rss_reps):
            for proxy in proxies:
                row = wl.row(proxy.name)
                if row.status != "ok":
                    continue
                with contextlib.ExitStack() as stack:
                    running = record(
                        row, stack.enter_context, ctx.fresh(proxy, ctx.upstreams.plain)
                    )
                    if running is None:
                        continue
                    idle = memory(running.pid)["VmRSS"]
                    with ctx.watch(running, f"{wl.id}-{rep}"):
                        ok = record(row, _stream, ctx, running.url, blob)
                    if ok:
                        row.samples.append(memory(running.pid)["VmHWM"])
                        row.extra.setdefault("idle_rss", []).append(round(idle, 1))
        out.append(wl)
    return out


def _stream(ctx: Context, url: str, blob: Blob) -> bool:
    timeout = 120 + blob.size / (10 * 1024 * 1024)
    fetched = fetch_one(url + ctx.blob_path(blob.digest), {}, timeout=timeout)
    if fetched.statuses != (200,) or fetched.sizes != (blob.size,):
        raise PeerError(f"got {fetched.statuses} {fetched.sizes}, want 200 and {blob.size} B")
    return True


def _size(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"
