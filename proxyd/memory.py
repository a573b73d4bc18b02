"""Manifests by digest that were just served from the store, kept in memory, and
the fresh tag resolutions that point at them.

A manifest hit otherwise reads the repository's link and the manifest file on every
request. Here the pair is remembered for `recheck` seconds, then read again from
disk, so the link (upstream's confirmation) stays the authority: a link removed by
eviction or a delete in another process is honoured within `recheck`, and one removed
by this process at once (the store counts its removals; any removal empties this).

A fresh tag answer otherwise costs a read of the small-response cache (a thread hop
to SQLite, or a round trip to Redis). `TagMemory` remembers a tag's answers (digest,
media type, the Accept that produced each: the resolver picks the one a client may
take, as from the record itself), for `recheck` seconds and never past the record's
own freshness; the bytes are taken from `ManifestMemory`, so a tag is answered from
memory only while its manifest is.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from proxyd.store import BlobStore

RECHECK = 1.0  # seconds a remembered hit is served before the disk is asked again
Key = tuple[str, str, str]  # namespace, repository, digest
D = TypeVar("D")  # what a remembered tag holds: its answers


@dataclass(frozen=True, slots=True)
class RememberedManifest:
    media_type: str
    body: bytes
    fresh_until: float  # monotonic time until which no recheck is needed


class ManifestMemory:
    """A byte-bounded LRU of confirmed manifest hits."""

    def __init__(
        self,
        store: BlobStore,
        max_bytes: int,
        *,
        recheck: float = RECHECK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.recheck = recheck
        self.clock = clock
        self.generation = 0  # changes whenever remembered hits are dropped
        self._entries: OrderedDict[Key, RememberedManifest] = OrderedDict()
        self._bytes = 0
        self._removals_seen = store.removals

    def get(self, key: Key) -> RememberedManifest | None:
        if self.store.removals != self._removals_seen:
            self.clear()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry.fresh_until:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: Key, media_type: str, body: bytes) -> RememberedManifest:
        entry = RememberedManifest(media_type, body, self.clock() + self.recheck)
        if len(body) > self.max_bytes:
            return entry
        self._drop(key)
        self._entries[key] = entry
        self._bytes += len(body)
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return entry

    def is_current(self, generation: int, fresh_until: float) -> bool:
        """Whether a hit remembered at `generation` may still be served without asking
        the store (the server's pre-rendered answers check this on every request)."""
        if self.store.removals != self._removals_seen:
            self.clear()
        return generation == self.generation and self.clock() < fresh_until

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self._removals_seen = self.store.removals
        self.generation += 1

    def _drop(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry.body)


class TagMemory(Generic[D]):
    """An entry-bounded LRU: a tag's key to its answers, kept as the caller has them
    (proxyd's core: parsed, so a hit parses nothing)."""

    def __init__(
        self,
        max_entries: int = 4096,
        *,
        recheck: float = RECHECK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.recheck = recheck
        self.clock = clock
        self._entries: OrderedDict[str, tuple[D, float]] = OrderedDict()

    def get(self, key: str) -> tuple[D, float] | None:
        """The digest and the (monotonic) time until which it may be served."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock() >= entry[1]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, digest: D, fresh_for: float) -> None:
        """Remember for `recheck` seconds at most, and no longer than `fresh_for`."""
        if fresh_for <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (digest, self.clock() + min(fresh_for, self.recheck))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
