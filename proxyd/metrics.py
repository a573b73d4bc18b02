"""Prometheus metrics. One `Metrics` per app with its own registry, so tests can run
several apps in one process; `/metrics` renders it."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # `*_created` adds nothing
        self.registry = CollectorRegistry(auto_describe=True)
        self._before_render: list[Callable[[], None]] = []
        r = self.registry
        self.requests = Counter(
            "proxyd_requests",
            "Requests served, by API route and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "proxyd_request_duration_seconds",
            "Time to answer a request, by route.",
            ["route"],
            registry=r,
        )
        self.cache = Counter(
            "proxyd_cache_lookups",
            "Answers by kind (manifest, blob, tag, tags) and result (hit, miss, "
            "revalidated, stale).",
            ["kind", "result"],
            registry=r,
        )
        self.bytes_served = Counter(
            "proxyd_served_bytes",
            "Body bytes sent to clients, by source (store, upstream).",
            ["source"],
            registry=r,
        )
        self.bytes_fetched = Counter(
            "proxyd_upstream_fetched_bytes",
            "Blob bytes fetched from upstream hosts.",
            ["host"],
            registry=r,
        )
        self.coalesced = Counter(
            "proxyd_coalesced_requests",
            "Requests that joined an upstream call already in flight.",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "proxyd_digest_mismatches",
            "Upstream content that did not match its digest.",
            ["host"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "proxyd_upstream_request_duration_seconds",
            "Time to an upstream host's response headers, by host and status class.",
            ["host", "status"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "proxyd_upstream_errors",
            "Upstream attempts that moved on to the next host, by host and reason.",
            ["host", "reason"],
            registry=r,
        )
        self.token_fetches = Counter(
            "proxyd_token_fetches",
            "Tokens fetched from token servers, by registry host.",
            ["host"],
            registry=r,
        )
        self.ratelimit_limit = Gauge(
            "proxyd_upstream_ratelimit_limit",
            "The RateLimit-Limit a host last announced.",
            ["host"],
            registry=r,
        )
        self.ratelimit_remaining = Gauge(
            "proxyd_upstream_ratelimit_remaining",
            "The RateLimit-Remaining a host last announced.",
            ["host"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "proxyd_circuit_open",
            "1 while a host is skipped by its circuit breaker.",
            ["host"],
            registry=r,
        )
        self.connections_dropped = Counter(
            "proxyd_connections_dropped",
            "Client connections proxyd closed on a bound, by reason (max_connections, "
            "header_timeout).",
            ["reason"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "proxyd_cache_size_bytes",
            "Bytes in the blob store (known after a scan).",
            registry=r,
        )
        self.cache_entries = Gauge(
            "proxyd_cache_entries",
            "Blobs in the blob store (known after a scan).",
            registry=r,
        )
        # -- the fleet ([cluster]) --
        self.peer_received_bytes = Counter(
            "proxyd_peer_received_bytes",
            "Blob bytes received from peers of the fleet.",
            registry=r,
        )
        self.peer_sent_bytes = Counter(
            "proxyd_peer_sent_bytes",
            "Blob bytes streamed to peers of the fleet.",
            registry=r,
        )
        self.upstream_saved_bytes = Counter(
            "proxyd_upstream_saved_bytes",
            "Bytes of verified blobs and manifests taken from a peer instead of the upstream.",
            registry=r,
        )
        self.peer_failures = Counter(
            "proxyd_peer_failures",
            "Blob requests to peers that failed, by reason (refused, busy, missing, "
            "unavailable, timeout, connection, digest).",
            ["reason"],
            registry=r,
        )
        self.peer_streams = Gauge(
            "proxyd_peer_streams",
            "Blobs this node is streaming to peers now.",
            registry=r,
        )
        self.fleet_redis_up = Gauge(
            "proxyd_fleet_redis_up",
            "1 while the fleet's Redis answers; 0: this node works alone.",
            registry=r,
        )
        self.fleet_redis_errors = Counter(
            "proxyd_fleet_redis_errors",
            "Calls to the fleet's Redis that failed or timed out, by operation.",
            ["operation"],
            registry=r,
        )
        self.fleet_sources = Counter(
            "proxyd_fleet_sources",
            "Where the directory sent this node for a blob: fetch (the fleet's one fetch "
            "from upstream), peer, upstream (its peers avoided), alone (Redis unreachable).",
            ["source"],
            registry=r,
        )

    def render(self) -> bytes:
        for settle in self._before_render:
            settle()
        return generate_latest(self.registry)

    def before_render(self, settle: Callable[[], None]) -> None:
        """Run `settle` before each scrape: for counts kept aside on a hot path."""
        self._before_render.append(settle)

    def watch(self, gauge: Gauge, read: Callable[[], float | None]) -> None:
        """Read a value when scraped (cache size, known only once scanned)."""

        def value() -> float:
            current = read()
            return float(current) if current is not None else float("nan")

        gauge.set_function(value)


class Observations:
    """Observations of one histogram (a labelled child) counted aside, and settled into
    it before each scrape (`Metrics.before_render`): `Histogram.observe` takes a lock
    for the sum and for a bucket and walks the buckets in Python, a sixth of what
    proxyd's own code spent answering a remembered hit. Where this prometheus-client
    keeps its buckets otherwise, each observation goes to `observe` at once. For one
    thread (the event loop's)."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        fits = (
            isinstance(bounds, list)
            and isinstance(buckets, list)
            and len(bounds) == len(buckets)
            and bool(bounds)
            and bounds[-1] == float("inf")
            and hasattr(getattr(histogram, "_sum", None), "inc")
        )
        self._bounds: list[float] | None = bounds if fits else None
        self._counts = [0] * len(self._bounds or ())
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        if self._bounds is None:
            self._histogram.observe(amount)
            return
        self._counts[bisect_left(self._bounds, amount)] += 1  # its bucket: amount <= bound
        self._sum += amount

    def settle(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        buckets: list[Any] = self._histogram._buckets
        for index, count in enumerate(counts):
            if count:
                buckets[index].inc(count)
                counts[index] = 0
        self._histogram._sum.inc(self._sum)
        self._sum = 0.0
