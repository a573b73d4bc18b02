"""Child processes the benchmark starts itself, and reading a process's memory.

A relay or drayage started here goes when the benchmark dies, even by SIGKILL
(``tests.peers.children``: ``PR_SET_PDEATHSIG``), so a killed run leaves nothing
listening. Memory is read from ``/proc/PID/status``: ``VmHWM`` is the peak resident
set since the process started, which is why memory is measured on a freshly started
proxy.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from tests.peers.children import popen

MIB = 1024 * 1024


def spawn(
    argv: Sequence[str], *, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout and stderr into ``log``; it dies with this process."""
    with log.open("ab") as out:
        return popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)


def listening_pid(port: int, timeout: float = 5.0) -> int:
    """The process listening on 127.0.0.1:``port`` (the proxy itself, not a wrapper)."""
    deadline = time.monotonic() + timeout
    while True:
        for conn in psutil.net_connections(kind="tcp"):
            address = conn.laddr  # an empty tuple for a socket not bound yet
            if conn.status != psutil.CONN_LISTEN or not isinstance(address, tuple) or not address:
                continue
            if address[1] == port and conn.pid is not None:
                return int(conn.pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no process is listening on port {port}")
        time.sleep(0.05)


def memory(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak) of ``pid`` in MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024 / MIB
    return values


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system seconds of ``pid`` so far: of the whole process (its children
    too), and of its main thread alone (an event loop's, for an asyncio server)."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    main = next((t.user_time + t.system_time for t in process.threads() if t.id == pid), 0.0)
    return float(total), float(main)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
