"""Per-host circuit breakers: a host that keeps failing is skipped for a cool-down,
so a dead mirror does not add its timeout to every request; then one request probes
it again. A 429 with Retry-After closes the host for as long as it asked.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_RETRY_AFTER = 3600.0


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
        self._hosts: dict[str, _State] = {}

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

    def failed(self, host: str, retry_after: float | None = None) -> None:
        state = self._hosts.setdefault(host, _State())
        state.failures += 1
        now = self._clock()
        if retry_after is not None:
            state.open_until = max(state.open_until, now + min(retry_after, MAX_RETRY_AFTER))
        elif state.failures >= self.threshold:
            state.open_until = now + self.cooldown
        state.probe_until = 0.0

    def open_hosts(self) -> list[str]:
        return [host for host, state in self._hosts.items() if state.open_until != 0.0]


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
