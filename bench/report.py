"""The targets of issues 6 and 19, and the table, JSON and Markdown every run writes.

Targets are judged on the medians of this run, for each proxy (the issue states
them for proxyd; the others are shown for comparison). A verdict is None ("n/a")
when a row needed for it did not run.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.results import DIRECT, Row, Workload, first_over_warmed

X, DASH = "\u00d7", "\u2013"  # the multiplication sign and the en dash of the tables
RSS_LIMIT_MIB = 80.0
BIG_LIMIT = 1.6  # a cold big blob's GET, over the direct one's (issue 19)
COLD_LIMIT = 1.10  # a cold pull over the direct one (issue 19; issue 6 asked 1.15)
FIRST_LIMIT = 1.05  # a fresh proxy's first pull, over its pull after the warm-up (issue 19)
RSS_FLAT_MIB = 8.0  # "flat": the large blob's peak at most this much above the small one's
RSS_STREAMING_MIB = 60.0  # the highest peak while streaming, any blob size (issue 19)
FLEET_BYTES = 1.01  # upstream bytes over the image: once, give or take each node's manifest GET
FLEET_WALL = 1.5  # the slowest node over one node pulling alone
NOTE_WIDTH = 70


@dataclass
class Verdict:
    met: bool | None
    detail: str


@dataclass
class Target:
    id: str
    text: str
    verdicts: dict[str, Verdict] = field(default_factory=dict)


def _ok(row: Row | None) -> bool:
    return row is not None and row.status == "ok" and bool(row.samples)


def _prefixed(workloads: Iterable[Workload], prefix: str) -> list[Workload]:
    return [w for w in workloads if w.id.startswith(prefix)]


def _over_direct(workload: Workload, proxy: str) -> float | None:
    return workload.ratio(proxy)


def _ratio_target(
    workloads: list[Workload],
    proxy: str,
    limit: float,
    of: Callable[[Workload, str], float | None] = _over_direct,
) -> Verdict:
    """Each workload's ratio (``of``: the proxy's median over the direct one's) at most
    ``limit``."""
    parts, met = [], True
    for wl in workloads:
        ratio = of(wl, proxy)
        if ratio is None:
            return Verdict(None, f"{wl.id}: no data")
        label = wl.id.rsplit("_", 1)[-1] + " " if len(workloads) > 1 else ""
        shown = f"{ratio:.2f}"
        if (float(shown) <= limit) != (ratio <= limit):  # 1.151 would read as 1.15
            shown = f"{ratio:.3f}"
        parts.append(f"{label}{shown}{X}")
        met = met and ratio <= limit
    return Verdict(met if parts else None, ", ".join(parts) or "no data")


def _crowd(workloads: list[Workload], proxy: str) -> Verdict:
    wl = next(iter(workloads), None)
    row = wl.rows.get(proxy) if wl else None
    ratio = wl.ratio(proxy) if wl else None
    if wl is None or not _ok(row) or ratio is None:
        return Verdict(None, "no data")
    assert row is not None
    gets = row.extra.get("upstream_gets", [])
    met = bool(gets) and all(g == 1 for g in gets) and ratio <= 1.5
    return Verdict(met, f"upstream GETs {','.join(map(str, gets))}; wall {ratio:.2f}{X} one pull")


HITS_OVER_DRAYAGE = 1.5  # issue 19 (issue 6 asked as many as drayage's)


def _hits(workloads: list[Workload], proxy: str) -> Verdict:
    """At least every other proxy's hits/s, and proxyd at least 1.5x drayage's."""
    wl = next(iter(workloads), None)
    if wl is None or not _ok(wl.rows.get(proxy)):
        return Verdict(None, "no data")
    mine = wl.rows[proxy].median or 0.0
    others = {n: r.median or 0.0 for n, r in wl.rows.items() if n not in (proxy, DIRECT) and _ok(r)}
    if not others:
        return Verdict(None, f"{mine:,.0f}/s; no other proxy ran")
    proxyds = proxy.startswith("proxyd")
    bar = {n: HITS_OVER_DRAYAGE if proxyds and n == "drayage" else 1.0 for n in others}
    shown = [
        f"{n} {v:,.0f}/s" + (f" ({mine / v:.2f}{X})" if bar[n] != 1.0 and v else "")
        for n, v in others.items()
    ]
    detail = f"{mine:,.0f}/s vs " + ", ".join(shown)
    missing = [n for n in wl.rows if n not in (proxy, DIRECT, *others)]
    if missing:
        detail += f" ({', '.join(missing)} did not run)"
    return Verdict(all(mine >= bar[n] * v for n, v in others.items()), detail)


def _peaks(workloads: list[Workload], proxy: str) -> list[float] | Verdict:
    """`proxy`'s peak RSS in each workload, or the verdict that one has no data."""
    peaks = []
    for wl in workloads:
        row = wl.rows.get(proxy)
        if not _ok(row):
            return Verdict(None, f"{wl.id}: no data")
        assert row is not None
        peaks.append(row.high or 0.0)
    return peaks


def _rss(workloads: list[Workload], proxy: str) -> Verdict:
    peaks = _peaks(workloads, proxy)
    if isinstance(peaks, Verdict):
        return peaks
    if len(peaks) < 2:
        return Verdict(None, "no data")
    small, large = peaks[0], peaks[-1]
    met = large <= RSS_LIMIT_MIB and large - small <= RSS_FLAT_MIB
    return Verdict(met, f"peak {small:.0f} → {large:.0f} MiB")


def _rss_streaming(workloads: list[Workload], proxy: str) -> Verdict:
    peaks = _peaks(workloads, proxy)
    if isinstance(peaks, Verdict):
        return peaks
    if not peaks:
        return Verdict(None, "no data")
    return Verdict(max(peaks) <= RSS_STREAMING_MIB, f"highest peak {max(peaks):.1f} MiB")


def _tag_economy(workloads: list[Workload], proxy: str) -> Verdict:
    """One GET serves every engine within tag_ttl; after it, only HEADs revalidate."""
    wl = next(iter(workloads), None)
    row = wl.rows.get(proxy) if wl else None
    rounds = row.extra.get("rounds", []) if row is not None and _ok(row) else []
    if len(rounds) < 2:
        return Verdict(None, "no data")
    (gets, heads), (gets_after, heads_after) = rounds[0], rounds[1]
    met = gets == 1 and heads == 0 and gets_after == 0 and heads_after >= 1
    return Verdict(met, f"GET/HEAD within tag_ttl {gets}/{heads}, after {gets_after}/{heads_after}")


@dataclass(frozen=True)
class FleetFigures:
    moved: float  # upstream bytes over the image's size
    wall: float  # the slowest node over one node of its kind pulling alone
    floored: float | None  # the slowest over max(alone, the machine's floor), if measured

    def text(self) -> str:
        floored = "" if self.floored is None else f", {self.floored:.2f}{X} max(alone, floor)"
        slowest = f"slowest {self.wall:.2f}{X} one alone{floored}"
        return f"upstream bytes {self.moved:.2f}{X} the image; {slowest}"


def fleet_figures(row: Row) -> FleetFigures | None:
    """A fleet row's figures: upstream bytes over the image's size, the slowest
    node's wall time over one node of its kind pulling alone, and over the larger of
    that and the machine's floor (as many warm nodes pulled from at once, no link:
    the best any fleet could do on this machine)."""
    moved, alone = row.extra.get("upstream_bytes"), row.extra.get("alone")
    size, floor = row.extra.get("image_bytes"), row.extra.get("floor")
    if not _ok(row) or not moved or not alone or not size or row.median is None:
        return None
    one = statistics.median(alone)
    floored = row.median / max(one, statistics.median(floor)) if floor else None
    return FleetFigures(statistics.median(moved) / size, row.median / one, floored)


def _fleet(workloads: list[Workload], proxy: str) -> Verdict:
    """The image crosses the link once for the whole fleet, and the slowest node
    takes at most 1.5 times what one node alone takes (judged on that figure; the
    one against the machine's floor is shown beside it)."""
    wl = next(iter(workloads), None)
    row = wl.rows.get(proxy) if wl else None
    if row is None:
        return Verdict(None, "not in this workload")
    figures = fleet_figures(row)
    if figures is None:
        return Verdict(None, "no data")
    met = figures.moved <= FLEET_BYTES and figures.wall <= FLEET_WALL
    return Verdict(met, figures.text())


def cpu_note(cpu: dict[str, Any]) -> str:
    """Who kept the CPUs busy during a measurement (``bench.cpu``): the machine's
    busy share of its CPUs over the span, and the nodes' and clients' parts of it."""
    busy = cpu.get("machine_busy") or 0.0
    if not busy or cpu.get("busy_share") is None:
        return ""
    nodes = sum(s for name, s in cpu["processes"].items() if name.startswith("node "))
    return (
        f"CPU busy {100 * cpu['busy_share']:.0f}% of {cpu['cpus']}: nodes "
        f"{100 * nodes / busy:.0f}%, clients {100 * cpu['clients'] / busy:.0f}%"
    )


def _big(workloads: list[Workload], proxy: str) -> Verdict:
    """Issue 19: ≤ 1.6 times the direct GET, and no slower than distribution's proxy."""
    judged = [w for w in workloads if w.id != "big_blob_256MiB"] or workloads  # 256: for RSS
    verdict = _ratio_target(judged, proxy, BIG_LIMIT)
    for wl in judged:
        mine, theirs = wl.ratio(proxy), wl.ratio("distribution")
        if verdict.met is not None and mine is not None and theirs is not None:
            verdict.met = verdict.met and mine <= theirs
    return verdict


def _first(workloads: list[Workload], proxy: str) -> Verdict:
    """Issue 19: a freshly started proxy's first pull within 5 % of one warmed up."""
    return _ratio_target(workloads, proxy, FIRST_LIMIT, first_over_warmed)


TARGETS: tuple[tuple[str, str, str, Callable[[list[Workload], str], Verdict]], ...] = (
    ("warm_pull", f"warm pull ≤ 1.0{X} direct", "warm_pull", lambda w, p: _ratio_target(w, p, 1.0)),
    (
        "cold_pull",
        f"cold pull ≤ {COLD_LIMIT:.2f}{X} direct (issue 19; issue 6 asked 1.15{X})",
        "cold_pull",
        lambda w, p: _ratio_target(w, p, COLD_LIMIT),
    ),
    (
        "first_pull",
        f"first pull of a fresh proxy ≤ {FIRST_LIMIT}{X} a warmed one's (issue 19)",
        "first_pull",
        _first,
    ),
    (
        "cold_ttfb",
        f"cold TTFB ≤ 1.2{X} upstream's",
        "cold_ttfb",
        lambda w, p: _ratio_target(w, p, 1.2),
    ),
    (
        "concurrent_cold",
        f"50 concurrent cold: exactly 1 upstream GET, wall ≤ 1.5{X} a single pull",
        "concurrent_cold",
        _crowd,
    ),
    (
        "manifest_hits",
        f"manifest hits/s ≥ distribution's, ≥ {HITS_OVER_DRAYAGE}{X} drayage's"
        f" (issue 19; issue 6 asked 1.0{X})",
        "manifest_hits",
        _hits,
    ),
    (
        "peak_rss",
        f"peak RSS ≤ {RSS_LIMIT_MIB:.0f} MiB and flat in blob size (+≤{RSS_FLAT_MIB:.0f} MiB)",
        "peak_rss",
        _rss,
    ),
    (
        "peak_rss_streaming",
        f"peak RSS streaming ≤ {RSS_STREAMING_MIB:.0f} MiB, every blob size (issue 19)",
        "peak_rss",
        _rss_streaming,
    ),
    (
        "tag_requests",
        "one tag for every engine: 1 upstream GET within tag_ttl, then only HEADs",
        "tag_requests",
        _tag_economy,
    ),
    (
        "fleet",
        f"a fleet pulling one image: upstream bytes 1.0{X} the image, slowest node "
        f"≤ {FLEET_WALL}{X} one alone",
        "fleet",
        _fleet,
    ),
    (
        "big_blob",
        f"cold big blob GET ≤ {BIG_LIMIT}{X} direct and ≤ distribution's",
        "big_blob",
        _big,
    ),
)


def evaluate(workloads: list[Workload], proxies: list[str]) -> list[Target]:
    out = []
    for target_id, text, prefix, judge in TARGETS:
        target = Target(target_id, text)
        chosen = _prefixed(workloads, prefix)
        if chosen:
            for proxy in proxies:
                target.verdicts[proxy] = judge(chosen, proxy)
            out.append(target)
    return out


# -- rendering ---------------------------------------------------------------------------


def _num(value: float | None, unit: str) -> str:
    if value is None:
        return DASH
    if unit == "req/s":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    return f"{value:.1f}"


def _note(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    notes = [row.extra["about"]] if "about" in row.extra else []
    if "upstream_gets" in row.extra:
        notes.append("upstream GETs " + ",".join(map(str, row.extra["upstream_gets"])))
    if (figures := fleet_figures(row)) is not None:
        notes.append(figures.text())
    if "cpu" in row.extra and (cpu := cpu_note(row.extra["cpu"])):
        notes.append(cpu)
    if "upstream_requests" in row.extra:
        asked = row.extra["upstream_requests"]
        notes.append("upstream " + ", ".join(f"{n} {kind}" for kind, n in asked.items()))
    if "redis_ops" in row.extra:
        notes.append(f"Redis commands {','.join(map(str, row.extra['redis_ops']))}")
    if "idle_rss" in row.extra:
        notes.append("idle " + ",".join(f"{v:.0f}" for v in row.extra["idle_rss"]) + " MiB")
    if row.extra.get("cpu_us_per_hit"):
        cpu = statistics.median(row.extra["cpu_us_per_hit"])
        notes.append(f"CPU {cpu:.1f} µs per hit")
    if any(row.extra.get("errors", [])):
        notes.append("errors " + ",".join(map(str, row.extra["errors"])))
    return "; ".join(notes)


HEADER = ("workload", "target", "median", f"min{DASH}max", "vs direct", "notes")


def rows(workloads: list[Workload]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for wl in workloads:
        first = True
        for name, row in wl.rows.items():
            ratio = wl.ratio(name)
            out.append(
                (
                    f"{wl.title} ({wl.unit})" if first else "",
                    name,
                    _num(row.median, wl.unit),
                    f"{_num(row.low, wl.unit)}{DASH}{_num(row.high, wl.unit)}"
                    if row.samples
                    else DASH,
                    f"{ratio:.2f}{X}" if ratio is not None else DASH,
                    _note(row),
                )
            )
            first = False
    return out


def _verdict_text(verdict: Verdict | None) -> str:
    if verdict is None or verdict.met is None:
        return "n/a" + (f" ({verdict.detail})" if verdict else "")
    return ("MET" if verdict.met else "MISSED") + f" ({verdict.detail})"


def text_table(workloads: list[Workload], targets: list[Target]) -> str:
    table = [HEADER, *rows(workloads)]
    clipped = [
        tuple(c if len(c) <= NOTE_WIDTH else c[: NOTE_WIDTH - 1] + "…" for c in r) for r in table
    ]
    widths = [max(len(r[i]) for r in clipped) for i in range(len(HEADER))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in clipped
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("targets:")
    for target in targets:
        lines.append(f"  {target.text}")
        for proxy, verdict in target.verdicts.items():
            lines.append(f"    {proxy:<13} {_verdict_text(verdict)}")
    return "\n".join(lines)


def _md(cell: str) -> str:
    cell = cell if len(cell) <= 160 else cell[:159] + "…"
    return cell.replace("|", "\\|")


def markdown(workloads: list[Workload], targets: list[Target], proxies: list[str]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows(workloads)]
    lines += ["", "| target | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
    for target in targets:
        cells = [_md(_verdict_text(target.verdicts.get(p))) for p in proxies]
        lines.append(f"| {target.text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_json(
    path: Path, meta: dict[str, Any], workloads: list[Workload], targets: list[Target]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "workloads": [w.to_json() for w in workloads],
        "targets": [
            {
                "id": t.id,
                "text": t.text,
                "verdicts": {p: {"met": v.met, "detail": v.detail} for p, v in t.verdicts.items()},
            }
            for t in targets
        ],
    }
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


START, END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"


def update_docs(doc: Path, table: str, meta: dict[str, Any]) -> bool:
    """Replace the text between the table markers of ``doc``; False when it has none."""
    text = doc.read_text() if doc.exists() else ""
    if START not in text or END not in text:
        return False
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    stamp = (
        f"`{meta.get('command')}`, {meta.get('finished')}, {meta.get('seconds')} s; "
        f"{meta.get('reps')} repetitions ({meta.get('pull_reps', meta.get('reps'))} of the pulls, "
        f"{meta.get('ttfb_reps', meta.get('reps'))} of the TTFB); "
        f"load average {meta.get('loadavg_1m_at_start')} at "
        f"start, {meta.get('loadavg_1m_at_end')} at the end.\n\n"
        f"Machine: {meta.get('nproc')} CPUs ({meta.get('cpu')}), {meta.get('memory_gib')} GiB, "
        f"{meta.get('os')}, kernel {meta.get('kernel')}. Versions: proxyd {meta.get('proxyd')}, "
        f"Python {meta.get('python')}, aiohttp {meta.get('aiohttp')}; "
        f"{meta.get('docker-registry')}; {meta.get('skopeo')}; {meta.get('drayage')}; "
        f"{meta.get('wrk')}.\n\n"
    )
    doc.write_text(f"{head}{START}\n{stamp}{table}{END}{tail}")
    return True
