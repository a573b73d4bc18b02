"""Workload 7: upstream manifest requests for one tag, pulled by every engine.

A mirror's main economy is the upstream requests it saves (Docker Hub counts manifest
GETs against each address's pull limit), and each engine asks for a tag with an
Accept of its own. Each target stands in front of the ``counted`` upstream (the plain
registry behind a relay that counts what it relays). In one *round*, skopeo, ctr (a
containerd of the workload's own, ``content fetch``), podman and, for proxyd,
``proxyd prefetch`` each pull the image by tag, one after the other. The first round
runs within one ``tag_ttl`` of the tag's first request; the second after that
``tag_ttl`` has passed. The relay's count of GETs and HEADs of the tag's manifest
path in each round is the measure; the row's sample is the first round's total.

proxyd's goal: one GET in the first round, and only HEADs (one) in the second.
distribution's proxy mode and drayage have no prefetch. ``direct`` is the engines
pulling from the upstream themselves: what they would ask of it without a proxy.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bench.context import Context
from bench.proxies import Proxyd, RunningProxy
from bench.results import DIRECT, Row, Workload, record
from bench.upstreams import RelayProcess
from tests.peers import PeerError
from tests.peers.clients import Containerd, Podman

Pull = Callable[["Target", str], object]  # an engine pulling `HOST/REPO:TAG` for a target


@dataclass
class Target:
    row: Row
    host: str
    prefetch: Callable[[str], None] | None = None
    podman: Podman | None = None
    first_round_at: float = 0.0


def tag_requests(ctx: Context) -> Workload:
    ttl = ctx.profile.tag_ttl
    wl = Workload(
        "tag_requests",
        f"upstream manifest requests for one tag, every engine (tag_ttl {ttl:g} s)",
        "req",
        "lower",
    )
    relay = ctx.upstreams.counted.relay
    assert relay is not None
    suffix = f"/{ctx.repository}/manifests/{ctx.image.tag}"
    proxies = [Proxyd(tag_ttl=ttl) if p.name == "proxyd" else p for p in ctx.ready_rows(wl)]
    with contextlib.ExitStack() as stack:
        engines = _engines(ctx, stack)
        if not engines:
            for row in wl.rows.values():
                row.status, row.reason = "n/a", "neither skopeo, ctr nor podman runs here"
            return wl
        wl.notes.append("engines: " + ", ".join(engines) + " (and prefetch, proxyd only)")
        targets = [Target(wl.row(DIRECT), ctx.upstreams.counted.host)]
        for proxy in proxies:
            row = wl.row(proxy.name)
            running: RunningProxy | None = record(
                row, stack.enter_context, ctx.fresh(proxy, ctx.upstreams.counted)
            )
            if running is not None:
                targets.append(Target(wl.row(proxy.name), running.host, running.prefetch))
        for target in targets:
            target.podman = stack.enter_context(_podman(ctx, target.row.target))
        for round_ in (0, 1):
            if round_:  # every target's tag_ttl passed since its first round began
                last = max(t.first_round_at for t in targets)
                time.sleep(max(0.0, last + ttl + 1 - time.monotonic()))
            for target in targets:
                if target.row.status == "ok":
                    record(target.row, _round, ctx, target, engines, relay, suffix, round_)
    return wl


def _round(
    ctx: Context,
    target: Target,
    engines: dict[str, Pull],
    relay: RelayProcess,
    suffix: str,
    round_: int,
) -> None:
    before = relay.count("GET", suffix), relay.count("HEAD", suffix)
    started = time.monotonic()
    if round_ == 0:
        target.first_round_at = started
    ref = f"{target.host}/{ctx.repository}:{ctx.image.tag}"
    for pull in engines.values():
        pull(target, ref)
    if target.prefetch is not None:
        target.prefetch(f"{ctx.repository}:{ctx.image.tag}")
    late = time.monotonic() - started > ctx.profile.tag_ttl
    if round_ == 0 and late and target.row.target != DIRECT:
        raise PeerError("the first round outlasted tag_ttl; raise the profile's tag_ttl")
    gets, heads = relay.count("GET", suffix) - before[0], relay.count("HEAD", suffix) - before[1]
    rounds = target.row.extra.setdefault("rounds", [])
    rounds.append([gets, heads])
    if round_ == 0:
        target.row.samples.append(gets + heads)
    else:
        first, second = rounds
        target.row.extra["about"] = (
            f"GET/HEAD within tag_ttl {first[0]}/{first[1]}, after it {second[0]}/{second[1]}"
        )


def _engines(ctx: Context, stack: contextlib.ExitStack) -> dict[str, Pull]:
    """The engines that run here, each as a pull of one reference."""
    timeout = ctx.profile.pull_timeout()
    engines: dict[str, Pull] = {}
    if shutil.which("skopeo"):
        engines["skopeo"] = lambda target, ref: _skopeo(ctx, ref, timeout)
    if shutil.which("containerd") and shutil.which("ctr"):
        containerd = stack.enter_context(Containerd(ctx.workdir / "tags-containerd"))
        engines["ctr"] = lambda target, ref: containerd.content_fetch(
            ref, plain_http=True, namespace=_namespace(target.row.target), timeout=timeout
        )
    if shutil.which("podman"):
        engines["podman"] = lambda target, ref: _require(target.podman).pull(
            ref, tls_verify=False, timeout=timeout
        )
    return engines


def _skopeo(ctx: Context, ref: str, timeout: float) -> None:
    dest = ctx.workdir / "tags-pulls" / f"{time.monotonic_ns()}"
    dest.mkdir(parents=True)
    try:
        ctx.skopeo.copy(f"docker://{ref}", f"dir:{dest}", timeout=timeout)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


@contextlib.contextmanager
def _podman(ctx: Context, name: str) -> Iterator[Podman | None]:
    if not shutil.which("podman"):
        yield None
        return
    podman = Podman(ctx.workdir / "tags-podman" / _namespace(name))
    try:
        yield podman
    finally:
        podman.close()


def _require(podman: Podman | None) -> Podman:
    if podman is None:
        raise PeerError("podman is not set up for this target")
    return podman


def _namespace(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
