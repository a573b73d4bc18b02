"""The measuring clients. Every request goes to 127.0.0.1 with a deadline.

- ``ttfb``: seconds from sending a GET on a new connection until the first body
  byte arrives (headers alone do not count: a buffering proxy can send them early).
- ``fetch_many``: N concurrent GETs, each on its own connection, bodies read and
  discarded; the wall time from the first request to the last byte.
- ``fetch_one``: one GET, read to the end; its duration.
- ``load``: requests per second at a fixed concurrency for a fixed time, with
  ``wrk`` when installed, else with ``bench.loadgen`` in a separate process.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from tests.peers import loopback_url

READ = 1 << 20


@dataclass(frozen=True)
class Fetched:
    seconds: float
    statuses: tuple[int, ...]
    sizes: tuple[int, ...]


def ttfb(url: str, headers: Mapping[str, str], *, timeout: float) -> float:
    return asyncio.run(_ttfb(loopback_url(url), dict(headers), timeout))


async def _ttfb(url: str, headers: dict[str, str], limit: float) -> float:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=limit)
    ) as session:
        started = time.perf_counter()
        async with session.get(url, headers=headers) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {url}: {response.status} {await response.text()}")
            first = await response.content.readany()
            if not first:
                raise RuntimeError(f"GET {url}: empty body")
            elapsed = time.perf_counter() - started
            response.close()  # drop the rest: only the first byte was asked for
            return elapsed


def fetch_many(url: str, n: int, headers: Mapping[str, str], *, timeout: float) -> Fetched:
    return asyncio.run(_fetch_many(loopback_url(url), n, dict(headers), timeout))


async def _fetch_many(url: str, n: int, headers: dict[str, str], limit: float) -> Fetched:
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=limit)
    ) as session:

        async def one() -> tuple[int, int]:
            async with session.get(url, headers=headers) as response:
                size = 0
                while chunk := await response.content.readany():
                    size += len(chunk)
                return response.status, size

        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - started
    return Fetched(elapsed, tuple(s for s, _ in results), tuple(b for _, b in results))


def fetch_one(url: str, headers: Mapping[str, str], *, timeout: float) -> Fetched:
    return fetch_many(url, 1, headers, timeout=timeout)


@dataclass(frozen=True)
class Load:
    tool: str
    requests: int
    errors: int  # non-2xx answers and socket errors
    seconds: float

    @property
    def per_second(self) -> float:
        return (self.requests - self.errors) / self.seconds if self.seconds else 0.0


def load(url: str, headers: Mapping[str, str], *, concurrency: int, seconds: float) -> Load:
    loopback_url(url)
    if shutil.which("wrk"):
        return _wrk(url, headers, concurrency, seconds)
    return _loadgen(url, headers, concurrency, seconds)


def _wrk(url: str, headers: Mapping[str, str], concurrency: int, seconds: float) -> Load:
    # One thread: the proxy under test gets the other core of a 2-core machine.
    # wrk takes whole seconds only.
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "5s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run(
        [*argv, url], capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or out}")
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if total is None:
        raise RuntimeError(f"wrk printed no totals:\n{out}\n{done.stderr}")
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return Load("wrk", int(total.group(1)), errors, float(total.group(2)) * unit)


def _loadgen(url: str, headers: Mapping[str, str], concurrency: int, seconds: float) -> Load:
    argv = [sys.executable, "-m", "bench.loadgen", url, "-c", str(concurrency)]
    argv += ["-d", str(seconds), "--headers", json.dumps(dict(headers))]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.loadgen exited {done.returncode}: {done.stderr.strip()}")
    result = json.loads(done.stdout)
    return Load("bench.loadgen", result["requests"], result["errors"], result["seconds"])
