"""The slowest an upstream body may arrive: on average at least `rate` bytes a second
over each window (a minute), as curl's `--speed-limit`/`--speed-time` judge a
transfer.

A read timeout is an idle timeout: every byte resets it, so an upstream dripping a
byte a second holds the clients streaming from it forever. A total deadline would cut
a large blob on a slow but honest link. A floor on the rate over a window cuts the
drip and lets the slow link be. Pure: the caller says when bytes arrived, on the
core's clock (tests advance it).
"""

from __future__ import annotations

from collections.abc import Callable

WINDOW = 60.0  # seconds over which the rate is averaged


class TooSlow(TimeoutError):
    """A body came slower than the floor: a timeout of its kind, the host's failure."""


class MinimumRate:
    """Judges one body's pace, a window at a time, as its chunks arrive: when a chunk
    comes after the window ended, what came within it must reach the floor. (A body
    that stops altogether is the read timeout's: no chunk comes to be judged.)"""

    def __init__(self, rate: int, clock: Callable[[], float], window: float = WINDOW) -> None:
        self.rate = rate
        self.window = window
        self._clock = clock
        self._started = clock()
        self._bytes = 0  # within the window that started then

    def arrived(self, size: int) -> None:
        """`size` bytes arrived now; raises TooSlow if the window before them fell short."""
        if self.rate <= 0:
            return
        now = self._clock()
        elapsed = now - self._started
        if elapsed >= self.window:
            if self._bytes < self.rate * elapsed:
                raise TooSlow(
                    f"too slow: {self._bytes} bytes in {elapsed:.0f} s "
                    f"(at least {self.rate} bytes/s over each {self.window:.0f} s)"
                )
            self._started, self._bytes = now, 0
        self._bytes += size
