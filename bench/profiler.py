"""Optional sampling profiles of proxyd while a workload runs (``--profile DIR``).

``py-spy record`` attaches to the proxyd PID for the span of one measurement and
writes collapsed stacks (``DIR/<label>.txt``) and a flame graph (``DIR/<label>.svg``);
``summary()`` turns the collapsed stacks into the functions that take the most time,
by own time and including callees, which is what docs/performance.md quotes.
Without ``--profile`` (or without py-spy) every ``attach`` is a no-op.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.peers.children import popen


class Profiler:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        beside = Path(sys.executable).parent / "py-spy"
        self.binary = str(beside) if beside.exists() else shutil.which("py-spy")
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.binary is not None

    @contextlib.contextmanager
    def attach(self, pid: int, label: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        assert self.directory is not None and self.binary is not None
        procs = [
            popen(
                [
                    *(self.binary, "record", "--pid", str(pid), "--rate", "250"),
                    *("--format", fmt, "--output", str(self.directory / f"{label}.{ext}")),
                    "--nonblocking",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for fmt, ext in (("raw", "txt"), ("flamegraph", "svg"))
        ]
        try:
            yield
        finally:
            for proc in procs:  # py-spy writes its output when interrupted
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def summary(collapsed: Path, top: int = 15) -> str:
    """Sample shares of the busiest lines (own time) and of proxyd's and aiohttp's
    functions including their callees, from one collapsed-stacks file."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in {f.rsplit(":", 1)[0] for f in frames if f.split("(")[-1].startswith(OURS)}:
            inclusive[frame] += count
    if total == 0:
        return f"{collapsed.name}: no samples"
    lines = [f"{collapsed.name}: {total} samples", "  own time, by line:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  proxyd and aiohttp functions, including callees:")
    lines += [f"    {100 * n / total:5.1f}%  {f})" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


OURS = ("proxyd/", "aiohttp/", "web_", "structlog/")


def _short(frame: str) -> str:
    """``func (/long/path/pkg/module.py:12)`` → ``func (pkg/module.py:12)``."""
    name, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short}:{line})"


def main() -> None:
    for path in sys.argv[1:]:
        print(summary(Path(path)))


if __name__ == "__main__":
    main()
