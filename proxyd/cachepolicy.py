"""The small-response policy: how an answer kept in the small-response cache is
served (aiohttp-client-cache's split: what may be served and for how long, here;
where the bytes live, proxyd.smallcache).

A fresh entry is served as is; an old one is revalidated or fetched again, once
however many clients ask; when every host fails, the old entry is served marked
stale; offline, entries of any age are served. The resolver asks through it for
tags, tag lists and referrers alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import structlog

from proxyd.errors import Offline, TooManyRequests, UpstreamError
from proxyd.hosts import Target
from proxyd.metrics import Metrics
from proxyd.singleflight import SingleFlight
from proxyd.smallcache import Entry, SmallCache

log = structlog.get_logger("proxyd.cachepolicy")
T = TypeVar("T")


class CachePolicy:
    def __init__(self, small: SmallCache, *, offline: bool, metrics: Metrics) -> None:
        self.small = small
        self.offline = offline
        self.metrics = metrics
        self._flights: SingleFlight[Any] = SingleFlight(on_join=metrics.coalesced.inc)

    async def answer(
        self,
        target: Target,
        key: str,
        kind: str,
        what: str,
        refresh: Callable[[Entry | None, bool], Awaitable[T]],
        from_entry: Callable[[Entry, str], T | None],
        changed_key: str | None = None,
        fits: Callable[[T], bool] | None = None,
        question: str = "",
    ) -> T:
        """A fresh entry is served; an old one is revalidated or refetched (once,
        however many ask); when every host fails, an old entry is served marked
        stale. --offline serves entries of any age.

        An entry may hold nothing for this client (`from_entry` gives None: a tag
        answered only in a type it cannot take): then upstream is asked as for a
        missing one. Clients asking at once share one upstream request whatever they
        accept; one that cannot take the answer (`fits`) asks again, sharing only with
        those asking its own `question`."""
        result: T | None = None
        for flight in (key, f"{key} {question}"):
            entry = await self.small.get(key)
            fresh = False
            if entry is not None:
                fresh = entry.age(self.small.now()) < target.namespace.tag_ttl
                if fresh and changed_key is not None:
                    changed = await self.small.get(changed_key)
                    fresh = changed is None or changed.stored_at < entry.stored_at
                if fresh or self.offline:
                    served = from_entry(entry, "hit" if fresh else "stale")
                    if served is not None:
                        self.metrics.cache.labels(kind, "hit" if fresh else "stale").inc()
                        return served
            if self.offline:
                raise Offline(f"offline, and {what} of {target.repository} is not cached")
            try:
                result = await self._flights.run(flight, partial(refresh, entry, fresh))
            except (UpstreamError, TooManyRequests) as exc:
                stale = from_entry(entry, "stale") if entry is not None else None
                if entry is None or stale is None:
                    raise
                self.metrics.cache.labels(kind, "stale").inc()
                log.warning(
                    "cache.stale",
                    namespace=target.namespace.name,
                    repository=target.repository,
                    what=what,
                    age_s=round(entry.age(self.small.now())),
                    error=exc.message,
                )
                return stale
            if fits is None or fits(result):
                break
        assert result is not None
        self.metrics.cache.labels(
            kind, "revalidated" if entry is not None and not fresh else "miss"
        ).inc()
        return result
