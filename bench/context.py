"""Everything a workload needs, built once by ``run``: the profile, the upstreams,
the proxies, the fixtures pushed upstream, and a work directory."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.fixtures import Blob
from bench.profiler import Profiler
from bench.profiles import Profile
from bench.proxies import REPOSITORY, Proxy, RunningProxy, running
from bench.results import Row, Workload, record
from bench.upstreams import Upstream, Upstreams
from tests.peers import http_request
from tests.peers.clients import Skopeo
from tests.peers.image import BuiltImage

OCI_ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
WARM_UP_TAG = "no-such-tag"
T = TypeVar("T")


def shuffled(turns: Sequence[T], rep: int) -> list[T]:
    """``turns`` in another order each repetition (seeded by it: the same from run to
    run), so that no target always follows the same one: what a measurement leaves
    behind (a stopped proxy's clean-up, the blobs it wrote, a path awake) weighs on all
    of them alike. In a fixed order, the direct pull always came right after the last
    proxy had stopped."""
    return random.Random(rep).sample(list(turns), len(turns))


@dataclass
class Context:
    profile: Profile
    workdir: Path
    upstreams: Upstreams
    proxies: list[Proxy]
    skopeo: Skopeo
    image: BuiltImage
    blob: Blob
    rss_blobs: tuple[Blob, Blob]
    profiler: Profiler = field(default_factory=Profiler)
    repository: str = REPOSITORY
    _fresh: int = 0

    def cache_dir(self, proxy: Proxy) -> Path:
        """A new, empty work directory for one start of ``proxy``."""
        self._fresh += 1
        return self.workdir / "proxies" / f"{proxy.name}-{self._fresh}"

    @contextlib.contextmanager
    def fresh(
        self, proxy: Proxy, upstream: Upstream, *, warm_up: bool = True
    ) -> Iterator[RunningProxy]:
        """``proxy`` on an empty cache, after one request that caches nothing.

        "Cold" means an empty cache, not a process that never served: the warm-up
        (HEAD of a tag upstream does not have) takes first-request costs (imports,
        the first upstream connection, the token) out of the measurement for every
        proxy alike, as a long-running proxy would have paid them already.
        ``warm_up=False``: the proxy as it answers its readiness check, for what a
        start costs the first pull (``pulls.first_pull``).
        """
        with running(proxy, upstream, self.cache_dir(proxy)) as started:
            if warm_up:
                self.warm_up(started.url)
            yield started

    def warm_up(self, base_url: str) -> None:
        """One request through everything on the way to the upstream, caching
        nothing: a measurement right after it finds every process on the way awake."""
        url = f"{base_url}/v2/{self.repository}/manifests/{WARM_UP_TAG}"
        http_request("HEAD", url, headers=OCI_ACCEPT, timeout=30)

    def each_fresh(
        self,
        workload: Workload,
        proxies: list[Proxy],
        upstream: Upstream,
        *,
        warm_up: bool = True,
        suffix: str = "",
    ) -> Iterator[tuple[Row, RunningProxy]]:
        """Each proxy whose row (its name and ``suffix``) is still ok, started fresh in
        front of ``upstream`` for the caller's turn and stopped before the next one
        starts. A start that fails is recorded in the proxy's row, and that proxy skipped."""
        for proxy in proxies:
            row = workload.row(proxy.name + suffix)
            if row.status != "ok":
                continue
            with contextlib.ExitStack() as stack:
                fresh = self.fresh(proxy, upstream, warm_up=warm_up)
                started = record(row, stack.enter_context, fresh)
                if started is not None:
                    yield row, started

    def watch(self, running: RunningProxy, label: str) -> contextlib.AbstractContextManager[None]:
        """Profile proxyd (only proxyd) for the span of one measurement, when asked to."""
        if running.name != "proxyd":
            return contextlib.nullcontext()
        return self.profiler.attach(running.pid, label)

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"

    def ready_rows(
        self,
        workload: Workload,
        row_names: Callable[[Proxy], Sequence[str]] = lambda proxy: (proxy.name,),
        upstream: Upstream | None = None,
    ) -> list[Proxy]:
        """The proxies that can run (and fetch from ``upstream``, when given); a row
        marked skipped for each one that cannot. Every proxy's rows (``row_names``: one,
        or one per way it is measured) are made here, so tables list them in one order
        whatever order they are measured in."""
        ready = []
        for proxy in self.proxies:
            reason = proxy.unavailable()
            if reason is None and upstream is not None:
                reason = proxy.cannot_reach(upstream)
            if reason is None:
                ready.append(proxy)
            for name in row_names(proxy):
                if reason is None:
                    workload.row(name)
                else:
                    workload.rows[name] = Row(name, status="skipped", reason=reason)
        return ready
