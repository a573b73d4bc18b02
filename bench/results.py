"""What a workload measured, and the statistics every report shows.

A ``Row`` is one target (``direct`` or a proxy) in one workload: its samples, or the
reason it has none. ``status`` is ``ok``, ``n/a`` (the proxy cannot do this
workload, with the reason), ``skipped`` (not installed) or ``error`` (it should have
worked and did not; the message says why). The ratio is the row's median over the
direct row's median, the number the targets are stated in.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

DIRECT = "direct"
ONE_HOP = "one hop"  # a relay that only moves bytes: the floor of any proxy's cost
WARMED = " warmed"  # a first-pull row's proxy that had the warm-up request (pulls.first_pull)


@dataclass
class Row:
    target: str
    status: str = "ok"
    reason: str = ""
    samples: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def low(self) -> float | None:
        return min(self.samples) if self.samples else None

    @property
    def high(self) -> float | None:
        return max(self.samples) if self.samples else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data |= {"median": self.median, "min": self.low, "max": self.high}
        return data


@dataclass
class Workload:
    id: str
    title: str
    unit: str  # "s", "ms", "req/s", "MiB"
    better: str  # "lower" or "higher"
    rows: dict[str, Row] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    has_direct: bool = True

    def __post_init__(self) -> None:
        if self.has_direct:  # the baseline comes first in every table
            self.row(DIRECT)

    def row(self, target: str) -> Row:
        return self.rows.setdefault(target, Row(target))

    def ratio(self, target: str) -> float | None:
        """The target's median over the direct median (None when either is missing)."""
        if not self.has_direct:
            return None
        base, row = self.rows.get(DIRECT), self.rows.get(target)
        if base is None or row is None or base.median in (None, 0) or row.median is None:
            return None
        assert base.median is not None
        return row.median / base.median

    def failures(self) -> list[str]:
        """Why this workload could not run at all: the direct baseline or proxyd failed."""
        out = []
        for target in ((DIRECT,) if self.has_direct else ()) + ("proxyd",):
            row = self.rows.get(target)
            if row is None or row.status == "error" or (row.status == "ok" and not row.samples):
                reason = row.reason if row is not None else "no row"
                out.append(f"{self.id}: {target}: {reason or 'no samples'}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "unit": self.unit,
            "better": self.better,
            "notes": self.notes,
            "rows": {
                name: row.to_json() | {"ratio": self.ratio(name)} for name, row in self.rows.items()
            },
        }


def warmed(target: str) -> str:
    """The row of ``target`` measured after the warm-up, beside its first-pull row."""
    return target + WARMED


def first_over_warmed(workload: Workload, target: str) -> float | None:
    """``target``'s median first pull over its median pull after the warm-up (None
    without both): what a start costs the first pull."""
    first, warm = workload.rows.get(target), workload.rows.get(warmed(target))
    if first is None or warm is None or first.status != "ok" or warm.status != "ok":
        return None
    if first.median is None or not warm.median:
        return None
    return first.median / warm.median


def record(row: Row, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one measurement; an exception marks the row ``error`` instead of ending the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # a failed measurement is a result, reported with its reason
        row.status = "error"
        row.reason = f"{type(exc).__name__}: {str(exc).strip()[:600]}"
        return None
