"""Child processes that go when the process that started them goes.

A test session or a benchmark killed with SIGKILL runs no finalizer, and the peers it
started (registries, redis-server, proxyds, relays) would keep their ports and files.
On Linux, ``popen`` starts each child with ``PR_SET_PDEATHSIG`` so the kernel sends
it SIGTERM when its parent dies; a child whose parent died before the call exits at
once. The kernel counts the *thread* that forked as the parent, so every child is
forked from one thread kept alive for the whole process: a child started from a
worker of a thread pool would otherwise be killed as soon as that worker ends.
Elsewhere ``popen`` is ``subprocess.Popen``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PR_SET_PDEATHSIG = 1
DEATH_SIGNAL = signal.SIGTERM  # a proxyd or a registry shuts down cleanly on it

# One worker, never idle-stopped: it lives until the interpreter exits.
_FORKER = ThreadPoolExecutor(1, thread_name_prefix="peer-forker")
# Loaded here, not in the child: between fork and exec nothing may take a lock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def popen(argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kwargs)``; the child dies with this process."""
    if _LIBC is None:
        return subprocess.Popen(list(argv), **kwargs)
    libc, parent = _LIBC, os.getpid()

    def die_with_parent() -> None:  # pragma: no cover - runs in the child
        libc.prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL))
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return _FORKER.submit(
        subprocess.Popen, list(argv), preexec_fn=die_with_parent, **kwargs
    ).result()
