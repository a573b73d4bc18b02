"""Where the CPU of one measurement went: the processes named, the clients, the rest.

A ``CpuMeter`` reads, when its span starts and ends, the user + system seconds of
each process named (``psutil``: the whole process, every thread), of this process's
children reaped meanwhile (``RUSAGE_CHILDREN``: the skopeos a crowd's pull ran and
waited for) and of the whole machine (``/proc/stat``: every CPU's busy time, other
work on the machine included). ``other`` is what the machine spent beyond all of
those: the harness itself, and whatever else shares the machine. With the span's
wall time and the machine's CPUs this says whether the CPUs were the bound (busy
close to ``cpus * wall``), and who kept them busy; docs/scale.md quotes it.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil

from bench.procs import cpu_seconds

_BUSY_FIELDS = 8  # user nice system idle iowait irq softirq steal: idle, iowait not busy


def machine_busy() -> float:
    """CPU seconds every CPU of the machine spent busy since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1 : 1 + _BUSY_FIELDS]
    ticks = [int(f) for f in fields]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float:
    """``bench.procs.cpu_seconds`` of the whole process, 0 once it is gone."""
    try:
        return cpu_seconds(pid)[0]
    except psutil.Error:
        return 0.0


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """``with CpuMeter({"node 1": pid, ...}) as cpu: ...``; then ``cpu.seconds``."""

    pids: Mapping[str, int]
    seconds: dict[str, float] = field(default_factory=dict)  # name: CPU seconds in the span
    clients: float = 0.0  # children reaped in the span
    machine: float = 0.0  # every CPU's busy seconds
    wall: float = 0.0
    _start: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> CpuMeter:
        self._start = {name: process_seconds(pid) for name, pid in self.pids.items()}
        self._start |= {
            ":clients": children_seconds(),
            ":machine": machine_busy(),
            ":wall": time.perf_counter(),
        }
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        start = self._start
        self.seconds = {name: process_seconds(pid) - start[name] for name, pid in self.pids.items()}
        self.clients = children_seconds() - start[":clients"]
        self.machine = machine_busy() - start[":machine"]
        self.wall = time.perf_counter() - start[":wall"]

    @property
    def other(self) -> float:
        """The machine's busy seconds that none of the processes measured spent."""
        return max(0.0, self.machine - self.clients - sum(self.seconds.values()))

    def to_json(self) -> dict[str, object]:
        cpus = os.cpu_count() or 1
        return {
            "wall": round(self.wall, 3),
            "cpus": cpus,
            "machine_busy": round(self.machine, 2),
            "busy_share": round(self.machine / (cpus * self.wall), 3) if self.wall else None,
            "clients": round(self.clients, 2),
            "other": round(self.other, 2),
            "processes": {name: round(s, 2) for name, s in self.seconds.items()},
        }
