"""When to leave a host alone, and for how long.

Three memories, each for its own reason. A circuit breaker per host: a host that keeps
failing (connections, timeouts, 5xx, broken bodies) is skipped for a cool-down, so a
dead mirror does not add its timeout to every request; then one request probes it
again. Pauses per host and kind of request: a rate limit (429 with Retry-After) stops
only what was limited (Docker Hub limits manifest GETs, never blobs), and a bad answer
(wrong bytes, a body cut short) keeps that request away from that host a while, so the
next one goes to the next host. Every memory is bounded: clients can name registries
(`allow_unconfigured_namespaces`), and nothing they invent may grow proxyd without end.
"""

from __future__ import annotations

import email.utils
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_RETRY_AFTER = 3600.0
# A 429 that names no wait (Docker Hub's pull limit sends no Retry-After): the kind of
# request is left alone this long, so clients asking meanwhile cost the host nothing.
DEFAULT_RATE_LIMIT_PAUSE = 60.0
MAX_REMEMBERED = 4096  # hosts with failures, or (host, kind) pauses: the oldest go first


@dataclass
class _State:
    failures: int = 0
    open_until: float = 0.0  # skipped until then
    probe_until: float = 0.0  # a probe is in flight until then


class Breakers:
    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self._hosts: OrderedDict[str, _State] = OrderedDict()

    def allow(self, host: str) -> bool:
        """Whether to try `host` now; after a cool-down one caller gets to probe."""
        state = self._hosts.get(host)
        if state is None or state.open_until == 0.0:
            return True
        now = self._clock()
        if now < state.open_until or now < state.probe_until:
            return False
        state.probe_until = now + self.cooldown  # this caller probes; others wait
        return True

    def is_open(self, host: str) -> bool:
        state = self._hosts.get(host)
        return state is not None and state.open_until != 0.0

    def succeeded(self, host: str) -> None:
        self._hosts.pop(host, None)

    def failed(self, host: str) -> None:
        state = self._hosts.get(host)
        if state is None:
            state = self._hosts[host] = _State()
            if len(self._hosts) > MAX_REMEMBERED:
                self._hosts.popitem(last=False)
        state.failures += 1
        if state.failures >= self.threshold:
            state.open_until = self._clock() + self.cooldown
        state.probe_until = 0.0

    def open_hosts(self) -> list[str]:
        return [host for host, state in self._hosts.items() if state.open_until != 0.0]


class Pauses:
    """Keys (a host and what was asked of it) left alone until a moment passes."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_REMEMBERED
    ) -> None:
        self._clock = clock
        self._max = max_entries
        self._until: OrderedDict[tuple[str, str], float] = OrderedDict()

    def pause(self, key: tuple[str, str], seconds: float) -> None:
        """Leave `key` alone for `seconds` (at most MAX_RETRY_AFTER) from now."""
        until = self._clock() + min(max(seconds, 0.0), MAX_RETRY_AFTER)
        self._until[key] = max(until, self._until.get(key, 0.0))
        self._until.move_to_end(key)
        while len(self._until) > self._max:
            self._until.popitem(last=False)

    def remaining(self, key: tuple[str, str]) -> float | None:
        """Seconds `key` stays paused; None when it is not (any more)."""
        until = self._until.get(key)
        if until is None:
            return None
        left = until - self._clock()
        if left <= 0:
            del self._until[key]
            return None
        return left

    def clear(self, key: tuple[str, str]) -> None:
        self._until.pop(key, None)


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait, at most MAX_RETRY_AFTER: `Retry-After` is delta-seconds (ASCII
    digits: `str.isdigit` also takes "²", which float() refuses) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)  # any length: float() has no digit limit
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return min(max(0.0, when.timestamp() - now()), MAX_RETRY_AFTER)
