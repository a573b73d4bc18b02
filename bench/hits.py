"""Workload 5: manifest-by-digest cache hits per second.

Each proxy is started on an empty cache, primed with one GET of the manifest by
digest, then loaded at a fixed concurrency for a fixed time (``wrk``, or
``bench.loadgen`` where wrk is missing). The direct row loads the plain upstream
registry itself. Answers other than 200 count as errors and are not counted as hits.

Hits per second move by ±15 % between repetitions on a shared machine; the CPU time a
proxy spends per hit (user + system, of its whole process) moves far less, so it is
noted too: it is what a change to the hit path changes.
"""

from __future__ import annotations

import contextlib

from bench.clients import Load, load
from bench.context import OCI_ACCEPT, Context, shuffled
from bench.procs import cpu_seconds
from bench.proxies import RunningProxy
from bench.results import DIRECT, Row, Workload, record
from tests.peers import PeerError, http_request


def manifest_hits(ctx: Context) -> Workload:
    upstream = ctx.upstreams.plain
    conc, secs = ctx.profile.concurrency, ctx.profile.load_seconds
    wl = Workload(
        "manifest_hits",
        f"manifest-by-digest hits/s, {conc} connections, {secs:g} s",
        "req/s",
        "higher",
    )
    proxies = ctx.ready_rows(wl)
    path = f"/v2/{ctx.repository}/manifests/{ctx.image.manifest_digest}"
    with contextlib.ExitStack() as stack:
        started: dict[str, RunningProxy] = {}
        for proxy in proxies:
            row = wl.row(proxy.name)
            running = record(row, stack.enter_context, ctx.fresh(proxy, upstream))
            if running is not None and record(row, _prime, running.url + path) is not None:
                started[proxy.name] = running
        targets = [(DIRECT, upstream.url, None), *((n, r.url, r) for n, r in started.items())]
        for rep in range(ctx.profile.reps):
            for name, url, running in shuffled(targets, rep):
                row = wl.row(name)
                if row.status != "ok":
                    continue
                watch = (
                    ctx.watch(running, f"{wl.id}-{rep}") if running else contextlib.nullcontext()
                )
                cpu = _cpu_seconds(running)
                with watch:
                    result = record(
                        row, load, url + path, OCI_ACCEPT, concurrency=conc, seconds=secs
                    )
                if result is not None:
                    _note(row, result, _cpu_seconds(running) - cpu)
    return wl


def _prime(url: str) -> bool:
    """One GET fills the cache; a second must be answered (from the cache) with 200."""
    for _ in range(2):
        answer = http_request("GET", url, headers=OCI_ACCEPT)
        if answer.status != 200:
            raise PeerError(f"GET {url}: {answer.status} {answer.body[:300]!r}")
    return True


def _cpu_seconds(running: RunningProxy | None) -> float:
    return 0.0 if running is None else cpu_seconds(running.pid)[0]


def _note(row: Row, result: Load, cpu: float) -> None:
    row.samples.append(result.per_second)
    if cpu and result.requests:
        row.extra.setdefault("cpu_us_per_hit", []).append(round(cpu / result.requests * 1e6, 1))
    row.extra["tool"] = result.tool
    row.extra.setdefault("errors", []).append(result.errors)
    row.extra.setdefault("requests", []).append(result.requests)
