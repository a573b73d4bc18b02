"""What proxyd remembers of each host of its chains, and counts: a circuit breaker
per host (connection errors, timeouts, 5xx, bodies that failed), a pause per host and
kind of request for a 429 (Docker Hub limits manifest GETs only), a pause per host and
path after a bad answer (the next request for it goes to the next host), and each
failure in the metrics and the log. `proxyd.upstream` asks it whom to skip and tells it
what each host did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog

from proxyd.breaker import DEFAULT_RATE_LIMIT_PAUSE, Breakers, Pauses, parse_retry_after
from proxyd.hosts import RegistryHost
from proxyd.metrics import Metrics

log = structlog.get_logger("proxyd.upstream")

RATELIMIT_WARN_FRACTION = 0.1  # warn when a host's announced pulls left fall below this


@dataclass
class HostFailure:
    host: RegistryHost
    reason: str
    status: int | None = None
    retry_after: str | None = None


class HostRecord:
    """The chain's memory of its hosts, shared by every request."""

    def __init__(self, breakers: Breakers, metrics: Metrics, *, clock: Callable[[], float]) -> None:
        self.breakers = breakers
        self.metrics = metrics
        self.rate_limits = Pauses(clock=clock)  # (host, kind of request)
        self.bad_answers = Pauses(clock=clock)  # (host, path)

    def skipped(
        self, host: RegistryHost, kind: str, path: str, *, last: bool
    ) -> HostFailure | None:
        """Why `host` is not asked now: rate limited for this kind of request, a bad
        answer to this very request lately (unless no other host is left), or a
        circuit open after failures."""
        limited = self.rate_limits.remaining((host.host, kind))
        if limited is not None:
            seconds = math.ceil(limited)
            return HostFailure(
                host, f"skipped: rate limited for {kind} ({seconds} s more)", 429, str(seconds)
            )
        if not last and self.bad_answers.remaining((host.host, path)) is not None:
            return HostFailure(host, "skipped: its last answer to this request was bad")
        if not self.breakers.allow(host.host):
            return HostFailure(host, "skipped: circuit open after failures")
        return None

    def rate_limited(
        self,
        host: RegistryHost,
        kind: str,
        failure: HostFailure,
        response: aiohttp.ClientResponse,
    ) -> None:
        """A 429 that stood: this kind of request leaves the host alone as it asked
        (`Retry-After`, else the draft RateLimit fields' `RateLimit-Reset`), or for
        DEFAULT_RATE_LIMIT_PAUSE when it named no time; the client is told how long."""
        seconds = parse_retry_after(failure.retry_after)
        if seconds is None:
            seconds = parse_retry_after(response.headers.get("RateLimit-Reset"))
        if seconds is None:
            seconds = DEFAULT_RATE_LIMIT_PAUSE
        failure.retry_after = failure.retry_after or str(math.ceil(seconds))
        if seconds:
            self.rate_limits.pause((host.host, kind), seconds)
            log.warning("upstream.rate_limited", host=host.host, kind=kind, seconds=seconds)

    def bad_answer(
        self,
        host: RegistryHost,
        path: str,
        failures: list[HostFailure],
        reason: str,
        *,
        trip: bool = True,
    ) -> None:
        """`host` answered `path` with a body that failed (broke off, stalled, did not
        match its digest): its failure, and the next request for `path` goes to the next
        host for a breaker cool-down."""
        self.bad_answers.pause((host.host, path), self.breakers.cooldown)
        self.failed(failures, HostFailure(host, reason), trip=trip)

    def answered(self, host: RegistryHost, path: str) -> None:
        self.breakers.succeeded(host.host)
        self.bad_answers.clear((host.host, path))
        self.metrics.circuit_open.labels(host.host).set(0)

    def failed(self, failures: list[HostFailure], failure: HostFailure, *, trip: bool) -> None:
        """Record a host's failure; `trip` counts it towards the host's circuit breaker."""
        failures.append(failure)
        host = failure.host.host
        if trip:
            self.breakers.failed(host)
            self.metrics.circuit_open.labels(host).set(int(self.breakers.is_open(host)))
        reason = str(failure.status) if failure.status else _reason_class(failure.reason)
        self.metrics.upstream_errors.labels(host, reason).inc()
        log.info("upstream.failed", host=host, reason=failure.reason)

    def observe(self, host: RegistryHost, response: aiohttp.ClientResponse, seconds: float) -> None:
        """Latency, and Docker Hub's rate-limit headers (`100;w=21600`)."""
        self.metrics.upstream_seconds.labels(host.host, f"{response.status // 100}xx").observe(
            seconds
        )
        limit = _leading_number(response.headers.get("RateLimit-Limit"))
        remaining = _leading_number(response.headers.get("RateLimit-Remaining"))
        if limit is not None:
            self.metrics.ratelimit_limit.labels(host.host).set(limit)
        if remaining is not None:
            self.metrics.ratelimit_remaining.labels(host.host).set(remaining)
            if limit and remaining < limit * RATELIMIT_WARN_FRACTION:
                log.warning(
                    "upstream.ratelimit_low", host=host.host, remaining=remaining, limit=limit
                )


def _leading_number(value: str | None) -> float | None:
    if not value:
        return None
    head = value.split(";", 1)[0].strip()
    try:
        return float(head)
    except ValueError:
        return None


def _reason_class(reason: str) -> str:
    if reason == "timed out" or reason.startswith("too slow"):
        return "timeout"
    if "circuit open" in reason:
        return "circuit_open"
    if "token" in reason:
        return "token"
    if "does not match its digest" in reason:
        return "digest"
    if "limit" in reason:  # a manifest over max_manifest_size
        return "too_large"
    return "connection"
