"""Who may stream a blob from this node, and how many at once: a peer of the fleet
presenting the fleet's shared secret (`Authorization: Bearer <secret>`, compared in
constant time, so its timing tells nothing of how much of a guess was right), and at
most `fanout` peers at a time for any one blob, the bound the directory's tree is
built on (`proxyd.directory`). A refused peer moves on to another source.

The secret is never logged nor put in an error; a refusal says only that the secret
was missing or wrong.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Iterator

from proxyd.errors import TooManyRequests, Unauthorized
from proxyd.metrics import Metrics
from proxyd.reference import Digest

SCHEME = "Bearer "


def authorization(secret: bytes) -> str:
    """The header value a peer request carries."""
    return SCHEME + secret.decode("ascii")  # printable ASCII (proxyd.clustersettings)


class PeerGate:
    def __init__(self, secret: bytes, *, fanout: int, metrics: Metrics) -> None:
        self._secret = secret
        self.fanout = fanout
        self.metrics = metrics
        self._streams: dict[Digest, int] = {}

    def admit(self, header: str | None) -> None:
        """Unauthorized unless `header` carries the fleet's secret."""
        given = b""
        if header is not None and header.startswith(SCHEME):
            given = header[len(SCHEME) :].encode("utf-8", "replace")
        if not hmac.compare_digest(given, self._secret):
            raise Unauthorized(
                "peer requests need the fleet's secret ([cluster] secret_file)"
                if header is None
                else "this is not the fleet's secret ([cluster] secret_file)"
            )

    @contextlib.contextmanager
    def stream(self, digest: Digest) -> Iterator[None]:
        """One more peer streaming `digest` for the block; TooManyRequests when
        `fanout` of them do already."""
        running = self._streams.get(digest, 0)
        if running >= self.fanout:
            raise TooManyRequests(
                f"this node streams {digest} to {running} peers already (fanout {self.fanout})",
                headers={"Retry-After": "1"},
            )
        self._streams[digest] = running + 1
        self.metrics.peer_streams.inc()
        try:
            yield
        finally:
            self.metrics.peer_streams.dec()
            left = self._streams[digest] - 1
            if left:
                self._streams[digest] = left
            else:
                del self._streams[digest]

    def streaming(self, digest: Digest) -> int:
        return self._streams.get(digest, 0)
