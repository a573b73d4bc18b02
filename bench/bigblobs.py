"""Workload 8: one cold GET of a big random blob (issue 19: CUDA and ML layers).

A blob of each of ``big_sizes`` is pushed to the plain upstream, then fetched
``big_reps`` times straight from it and through each proxy started afresh (an empty
cache), the targets interleaved in another order each repetition. The sample is the
wall time of one GET read to the end; the notes give MiB/s and, for a proxy, its peak
RSS (``VmHWM``) over that GET: a proxy whose peak grows with the blob holds it in
memory, and the CPU time (user + system) it spent over the GET, of the whole process
and of its main thread (proxyd's event loop). The wall time follows the machine's load
far more than the proxy's own CPU does: an A/B of two proxyds compares their CPU.

The client is ``curl`` writing to /dev/null when it is installed: at 1-2 GiB/s an
aiohttp client in Python takes most of a core, which on two cores is taken from the
proxy being measured. Without curl, ``bench.clients.fetch_one``; the JSON says which.

The same blobs are then fetched over HTTPS (``https_blob_*``, not judged by a target):
from the ``tls`` upstream, the plain registry's storage served with a test CA's
certificate, straight and through each proxy told to trust that CA (proxyd by the
host's ``ca``, distribution by ``SSL_CERT_FILE``; drayage cannot be told one, and its
rows say so). Real registries are HTTPS, and a TLS connection reads, decrypts and
copies differently from a plain one (docs/performance.md, "HTTPS reads"). Needs curl.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from pathlib import Path

from bench.clients import fetch_one
from bench.context import Context, shuffled
from bench.fixtures import Blob, make_blob
from bench.procs import cpu_seconds, memory
from bench.proxies import Proxy
from bench.results import DIRECT, Row, Workload, record
from bench.upstreams import Upstream
from tests.peers import PeerError

MIB = 1024 * 1024
SEED = 19


def big_blobs(ctx: Context) -> list[Workload]:
    client = "curl" if shutil.which("curl") else "bench.clients"
    blobs = []
    for size in ctx.profile.big_sizes:
        print(f"   pushing a {_size(size)} random blob", flush=True)
        plain = ctx.upstreams.plain.url
        blobs.append(make_blob(ctx.workdir / "big", plain, ctx.repository, size, seed=SEED))
    out = [_measure(ctx, blob, ctx.upstreams.plain, client, "big_blob", "") for blob in blobs]
    for blob in blobs:
        out.append(_measure(ctx, blob, ctx.upstreams.tls, client, "https_blob", " over HTTPS"))
    return out


def _measure(
    ctx: Context, blob: Blob, upstream: Upstream, client: str, kind: str, how: str
) -> Workload:
    """The cold GETs of `blob` from `upstream`, direct and through each proxy."""
    size = blob.size
    name = _size(size)
    wl_id = f"{kind}_{name.replace(' ', '')}"
    wl = Workload(wl_id, f"cold GET of a {name} blob{how}", "s", "lower")
    wl.notes.append(f"client: {client}")
    proxies = ctx.ready_rows(wl, upstream=upstream)
    if upstream.ca is not None and client != "curl":
        for row in wl.rows.values():
            row.status, row.reason = "skipped", "over HTTPS the client is curl"
        return wl
    direct = wl.row(DIRECT)
    url = upstream.url + ctx.blob_path(blob.digest)
    for rep in range(ctx.profile.big_reps):
        for proxy in shuffled([None, *proxies], rep):  # None: direct
            if proxy is None:
                if direct.status == "ok":
                    _warm_up(ctx, upstream)
                    _sample(direct, blob, url, client, upstream.ca)
                continue
            _proxy_turn(ctx, wl, proxy, upstream, blob, client, rep)
    for row in wl.rows.values():
        _summarise(row, size)
    return wl


def _warm_up(ctx: Context, upstream: Upstream) -> None:
    """The harness's warm-up request; over HTTPS one of curl's (urllib is the harness's
    client, and it talks plain http only)."""
    if upstream.ca is None:
        ctx.warm_up(upstream.url)
        return
    argv = [*_curl(30, upstream.ca), f"{upstream.url}/v2/"]
    subprocess.run(argv, capture_output=True, timeout=40, check=False)


def _proxy_turn(
    ctx: Context,
    wl: Workload,
    proxy: Proxy,
    upstream: Upstream,
    blob: Blob,
    client: str,
    rep: int,
) -> None:
    for row, running in ctx.each_fresh(wl, [proxy], upstream):
        idle = memory(running.pid)["VmRSS"]
        before = cpu_seconds(running.pid)
        with ctx.watch(running, f"{wl.id}-{rep}"):
            ok = _sample(row, blob, running.url + ctx.blob_path(blob.digest), client)
        if ok:
            after = cpu_seconds(running.pid)
            row.extra.setdefault("peak_rss", []).append(round(memory(running.pid)["VmHWM"], 1))
            row.extra.setdefault("idle_rss", []).append(round(idle, 1))
            row.extra.setdefault("cpu_s", []).append(round(after[0] - before[0], 3))
            row.extra.setdefault("main_thread_cpu_s", []).append(round(after[1] - before[1], 3))


def _sample(row: Row, blob: Blob, url: str, client: str, ca: Path | None = None) -> bool:
    seconds = record(row, _get, url, blob, client, ca)
    if seconds is None:
        return False
    row.samples.append(seconds)
    return True


def _get(url: str, blob: Blob, client: str, ca: Path | None = None) -> float:
    """Seconds for one GET of ``url`` read to the end (over HTTPS trusting ``ca``); the
    whole blob, or an error."""
    timeout = 60 + blob.size / (20 * MIB)
    if client == "bench.clients":
        fetched = fetch_one(url, {}, timeout=timeout)
        status, got, seconds = fetched.statuses[0], fetched.sizes[0], fetched.seconds
    else:
        argv = _curl(timeout, ca)
        argv += ["-w", "%{http_code} %{size_download} %{time_total}", url]
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout + 10, check=False
        )
        if done.returncode != 0:
            raise PeerError(f"curl exited {done.returncode}: {done.stderr.strip()}")
        code, size, total = done.stdout.split()
        status, got, seconds = int(code), int(size), float(total)
    if status != 200 or got != blob.size:
        raise PeerError(f"got {status} and {got} B, want 200 and {blob.size} B")
    return seconds


def _curl(timeout: float, ca: Path | None) -> list[str]:
    """curl discarding the body, bounded by `timeout`, trusting `ca` over HTTPS."""
    argv = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(timeout))]
    return argv + (["--cacert", str(ca)] if ca is not None else [])


def _summarise(row: Row, size: int) -> None:
    """MiB/s of the median, the highest peak RSS and the median CPU, in the row's note."""
    if row.status != "ok" or not row.samples:
        return
    about = [f"{size / MIB / statistics.median(row.samples):,.0f} MiB/s"]
    if row.extra.get("peak_rss"):
        about.append(f"peak RSS {max(row.extra['peak_rss']):.0f} MiB")
    if row.extra.get("cpu_s"):
        cpu = statistics.median(row.extra["cpu_s"])
        main = statistics.median(row.extra["main_thread_cpu_s"])
        about.append(f"CPU {cpu:.2f} s (main thread {main:.2f} s)")
    row.extra["about"] = "; ".join(about)


def _size(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 and not size % (1 << 30) else f"{size >> 20} MiB"
