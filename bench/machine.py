"""The machine and the versions a run measured, so numbers are never quoted without
them."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        return "not installed"
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    return round(int(match.group(1)) / 1024 / 1024, 1) if match else 0.0


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(root: Path) -> str:
    """The commit measured, ``+dirty`` when proxyd/ has uncommitted changes."""
    head = _first_line(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "proxyd"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return head + ("+dirty" if status.stdout.strip() else "")


def describe(root: Path, drayage: str | None) -> dict[str, object]:
    """nproc, memory, CPU model and the versions of everything measured."""
    wrk = _first_line(["wrk", "--version"])
    return {
        "nproc": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "memory_gib": _memory_gib(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": sys.version.split()[0],
        "proxyd": f"{_package('proxyd')} ({_git(root)})",
        "aiohttp": _package("aiohttp"),
        "docker-registry": _first_line(["docker-registry", "--version"]),
        "skopeo": _first_line(["skopeo", "--version"]),
        "drayage": _first_line([drayage, "--version"]) if drayage else "not installed",
        "wrk": wrk.split(" [")[0] if wrk != "not installed" else "not installed (bench.loadgen)",
    }
