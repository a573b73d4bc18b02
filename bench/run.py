"""``python -m bench.run [--smoke]``: start the upstreams and fixtures, run the ten
workloads against the direct upstream, proxyd, distribution's proxy mode and
drayage, print the table and the targets, and write ``bench/results/*.json``.

Everything it starts listens on 127.0.0.1 and is stopped on the way out: at the end,
on an exception, on Ctrl-C, on SIGTERM, or when the profile's deadline passes.
Exit status: 0 when every workload ran (whatever the numbers), 1 when a workload
could not run at all (its direct baseline or proxyd had no result), 2 on bad usage.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as ``python bench/run.py``: import as a package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import datetime as dt
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType

import pytest

from bench import bigblobs, blobs, fixtures, fleet, hits, memory, pulls, report, tags
from bench.context import Context
from bench.machine import describe
from bench.profiler import Profiler, summary
from bench.profiles import PROFILES, Profile
from bench.proxies import ALL, REPOSITORY, Drayage, by_name
from bench.results import Workload
from bench.upstreams import Upstreams
from tests.peers.clients import Skopeo

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "performance.md"

WORKLOADS: dict[str, Callable[[Context], list[Workload]]] = {
    "warm_pull": lambda c: [
        pulls.warm_pull(c, c.upstreams.plain),
        pulls.warm_pull(c, c.upstreams.token),
    ],
    "cold_pull": lambda c: [
        pulls.cold_pull(c, c.upstreams.plain),
        pulls.cold_pull(c, c.upstreams.token),
    ],
    "first_pull": lambda c: [
        pulls.first_pull(c, c.upstreams.plain),
        pulls.first_pull(c, c.upstreams.token),
    ],
    "cold_ttfb": lambda c: [blobs.time_to_first_byte(c)],
    "concurrent_cold": lambda c: [blobs.concurrent_cold(c)],
    "manifest_hits": lambda c: [hits.manifest_hits(c)],
    "peak_rss": memory.peak_rss,
    "tag_requests": lambda c: [tags.tag_requests(c)],
    "fleet": lambda c: [fleet.fleet(c)],
    "big_blob": bigblobs.big_blobs,
}


class Stop(BaseException):
    """A signal or the deadline: unwind through every cleanup, then exit."""


def _stop(signum: int, frame: FrameType | None) -> None:
    """Raise once; later signals are ignored so the cleanup (bounded) can finish."""
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition (CI)")
    parser.add_argument("--reps", type=int, help="repetitions (default: the profile's)")
    parser.add_argument("--only", nargs="+", choices=sorted(WORKLOADS), help="these workloads")
    parser.add_argument(
        "--proxies", nargs="+", default=[p.name for p in ALL], help="default: all three"
    )
    parser.add_argument(
        "--big-sizes", nargs="+", type=int, metavar="MIB", help="the big_blob sizes, in MiB"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also run the proxyd of another checkout (e.g. a worktree of main), as proxyd-before",
    )
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy profiles of proxyd")
    parser.add_argument("--update-docs", action="store_true", help="rewrite the table in docs")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.out is not None and args.out.is_dir():  # found before the run, not after it
        parser.error(f"--out {args.out} is a directory: give the results file's path")
    return args


def build_context(
    args: argparse.Namespace, profile: Profile, workdir: Path, ups: Upstreams
) -> Context:
    """Push the image to both registries and the blobs to the plain one."""
    skopeo = Skopeo(workdir / "skopeo")
    sizes = "+".join(str(s >> 20) for s in profile.layer_sizes)
    print(f"building and pushing an image of {sizes} MiB layers", flush=True)
    image = fixtures.build_image(workdir / "image", list(profile.layer_sizes))
    fixtures.push(skopeo, image, ups.plain.host, REPOSITORY, None)
    fixtures.push(skopeo, image, ups.token_registry.host, REPOSITORY, ups.token.creds_text)
    shutil.rmtree(workdir / "image")
    print("uploading the blobs", flush=True)
    blobs_dir = workdir / "blobs"
    blob = fixtures.make_blob(blobs_dir, ups.plain.url, REPOSITORY, profile.blob_size, seed=3)
    small = fixtures.make_blob(blobs_dir, ups.plain.url, REPOSITORY, profile.rss_sizes[0], seed=4)
    large = fixtures.make_blob(blobs_dir, ups.plain.url, REPOSITORY, profile.rss_sizes[1], seed=5)
    return Context(
        profile=profile,
        workdir=workdir,
        upstreams=ups,
        proxies=by_name(args.proxies, baseline=args.baseline),
        skopeo=skopeo,
        image=image,
        blob=blob,
        rss_blobs=(small, large),
        profiler=Profiler(args.profile),
    )


def run_workloads(ctx: Context, names: list[str]) -> list[Workload]:
    done: list[Workload] = []
    for name in names:
        started = time.monotonic()
        print(f"-- {name}", flush=True)
        for workload in WORKLOADS[name](ctx):
            done.append(workload)
            for row in workload.rows.values():
                shown = ", ".join(f"{v:.4g}" for v in row.samples) or row.reason[:200]
                print(f"   {workload.id:<22} {row.target:<13} {row.status:<7} {shown}", flush=True)
        print(f"   ({time.monotonic() - started:.0f} s)", flush=True)
    return done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "full"]
    if args.reps:
        profile = replace(
            profile,
            reps=args.reps,
            pull_reps=args.reps,
            ttfb_reps=args.reps,
            rss_reps=min(profile.rss_reps, args.reps),
            big_reps=args.reps,
        )
    if args.big_sizes:
        profile = replace(profile, big_sizes=tuple(m << 20 for m in args.big_sizes))
    names = args.only or list(WORKLOADS)
    out = args.out or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)
    signal.alarm(int(profile.deadline))
    started, load_at_start = time.monotonic(), os.getloadavg()[0]
    if load_at_start > 0.5:
        print(f"note: load average {load_at_start:.2f} at start: other work shares the CPUs")
    workdir = Path(tempfile.mkdtemp(prefix="proxyd-bench-"))
    workloads: list[Workload] = []
    try:
        with Upstreams(
            workdir / "upstreams", slow_rate=profile.slow_rate, crowd_rate=profile.crowd_rate
        ) as ups:
            ups.start()
            ctx = build_context(args, profile, workdir, ups)
            workloads = run_workloads(ctx, names)
    except Stop as stop:
        print(f"\nstopped ({stop}); everything started was stopped", file=sys.stderr)
        return 130 if str(stop) != "SIGALRM" else 1
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:  # the harness's way to fail
        print(f"bench: a peer is missing or did not start: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    seconds = round(time.monotonic() - started)
    proxies = [p.name for p in by_name(args.proxies, baseline=args.baseline)]
    targets = report.evaluate(workloads, proxies)
    command = "make bench-smoke" if args.smoke else "make bench"
    meta = describe(ROOT, Drayage().binary()) | {
        "profile": profile.name,
        "reps": profile.reps,
        "pull_reps": profile.pull_reps,
        "ttfb_reps": profile.ttfb_reps,
        "command": command,
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds,
        "loadavg_1m_at_start": round(load_at_start, 2),
    }
    print()
    print(report.text_table(workloads, targets))
    if args.smoke:
        print("\n(smoke sizes: the numbers say that each workload runs, not how fast)")
    report.write_json(out, meta, workloads, targets)
    table = report.markdown(workloads, targets, proxies)
    out.with_suffix(".md").write_text(table)
    print(f"\nwrote {out} and {out.with_suffix('.md')} ({seconds} s)")
    if args.update_docs and report.update_docs(DOC, table, meta):
        print(f"updated the table in {DOC}")
    if args.profile:
        for collapsed in sorted(args.profile.glob("*.txt")):
            print(summary(collapsed, top=8))
    failures = [f for w in workloads for f in w.failures()]
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures or not workloads else 0


if __name__ == "__main__":
    sys.exit(main())
