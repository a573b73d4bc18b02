"""A bounded HTTP load generator, for machines without ``wrk``.

``python -m bench.loadgen URL -c 32 -d 5`` keeps 32 keep-alive connections busy with
GETs of URL for 5 seconds and prints ``{"requests", "errors", "seconds"}`` as JSON.
It runs in its own process so its event loop has a core of its own, not the GIL of
the benchmark. Only 127.0.0.1 is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp


async def run(
    url: str, concurrency: int, seconds: float, headers: dict[str, str]
) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    counts = {"requests": 0, "errors": 0}
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    async with session.get(url, headers=headers) as response:
                        await response.read()
                        ok = 200 <= response.status < 400
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                counts["requests"] += 1
                counts["errors"] += 0 if ok else 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {**counts, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("-c", "--concurrency", type=int, default=32)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--headers", default="{}", help="JSON object of request headers")
    args = parser.parse_args()
    if not args.url.startswith("http://127.0.0.1:"):
        sys.exit("loadgen: only http://127.0.0.1 targets")
    duration = min(args.duration, 60.0)
    result = asyncio.run(run(args.url, args.concurrency, duration, json.loads(args.headers)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
