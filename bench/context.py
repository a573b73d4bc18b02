"""Everything a workload needs, built once by ``run``: the profile, the upstreams,
the proxies, the fixtures pushed upstream, and a work directory."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sequence
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
    def fresh(self, proxy: Proxy, upstream: Upstream) -> Iterator[RunningProxy]:
        """``proxy`` on an empty cache, after one request that caches nothing.

        "Cold" means an empty cache, not a process that never served: the warm-up
        (HEAD of a tag upstream does not have) takes first-request costs (imports,
        the first upstream connection, the token) out of the measurement for every
        proxy alike, as a long-running proxy would have paid them already.
        """
        with running(proxy, upstream, self.cache_dir(proxy)) as started:
            self.warm_up(started.url)
            yield started

    def warm_up(self, base_url: str) -> None:
        """One request through everything on the way to the upstream, caching
        nothing: a measurement right after it finds every process on the way awake."""
        url = f"{base_url}/v2/{self.repository}/manifests/{WARM_UP_TAG}"
        http_request("HEAD", url, headers=OCI_ACCEPT, timeout=30)

    def each_fresh(
        self, workload: Workload, proxies: list[Proxy], upstream: Upstream
    ) -> Iterator[tuple[Row, RunningProxy]]:
        """Each proxy whose row is still ok, started fresh in front of ``upstream``
        for the caller's turn and stopped before the next one starts. A start that
        fails is recorded in the proxy's row, and that proxy skipped."""
        for proxy in proxies:
            row = workload.row(proxy.name)
            if row.status != "ok":
                continue
            with contextlib.ExitStack() as stack:
                started = record(row, stack.enter_context, self.fresh(proxy, upstream))
                if started is not None:
                    yield row, started

    def watch(self, running: RunningProxy, label: str) -> contextlib.AbstractContextManager[None]:
        """Profile proxyd (only proxyd) for the span of one measurement, when asked to."""
        if running.name != "proxyd":
            return contextlib.nullcontext()
        return self.profiler.attach(running.pid, label)

    def blob_path(self, digest: str) -> str:
        return f"/v2/{self.repository}/blobs/{digest}"

    def ready_rows(self, workload: Workload) -> list[Proxy]:
        """The proxies that can run; a row marked skipped for each one that cannot.
        Every proxy's row is made here, so tables list them in one order whatever
        order they are measured in."""
        ready = []
        for proxy in self.proxies:
            reason = proxy.unavailable()
            if reason is None:
                workload.row(proxy.name)
                ready.append(proxy)
            else:
                workload.rows[proxy.name] = Row(proxy.name, status="skipped", reason=reason)
        return ready
