"""glibc's heap kept for the large buffers of a blob download.

A blob body arrives in bytes of up to `upstream.SOCKET_READ` (512 KiB), made and freed
two thousand times a GiB. Left to itself, glibc gives the top of its heap back to the
kernel whenever more than its trim threshold is free there (twice the mmap threshold,
which it raises to the largest block freed: ~1 MiB here), and takes it back for the
next chunk, whose pages then fault in anew, zeroed by the kernel (and on a VM that
hands free memory back to its host, fetched from the host first). On a cold 1 GiB
blob a fifth of the event loop's CPU went to those faults and `brk` calls.

Fixed thresholds keep such buffers in the heap (below `MMAP_THRESHOLD`) and up to
`TRIM_THRESHOLD` bytes free at its top: the event loop's CPU for the same blob fell by
12-27 % in four A/B runs (docs/performance.md, "Big cold blobs"), and the peak RSS
moved by 1 MiB at most: the buffers in use are what it holds. An operator's own
malloc settings (the MALLOC_*_ variables, GLIBC_TUNABLES) win: then nothing is set.

Once serving begins, the free memory the start left behind is given back
(`release_free`): the kept top is for the downloads, not for what imports freed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20  # blocks below this come from the heap, not a mmap each
TRIM_THRESHOLD = 8 << 20  # free bytes at the heap's top kept, not given back
OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

Mallopt = Callable[[int, int], int]


def glibc_mallopt() -> Mallopt | None:
    """glibc's `mallopt`, or None with another C library (musl's does nothing)."""
    return cast(Mallopt | None, _glibc("mallopt"))


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None with another C library."""
    return cast(Callable[[int], int] | None, _glibc("malloc_trim"))


def _glibc(name: str) -> Any:
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return getattr(ctypes.CDLL(None), name)
    except (ValueError, OSError, AttributeError):
        return None


def keep_heap(environ: Mapping[str, str] = os.environ, mallopt: Mallopt | None = None) -> bool:
    """Set the thresholds, once, at start; whether they were set."""
    if any(name in environ for name in OPERATOR_SETTINGS):
        return False
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = mallopt or glibc_mallopt()
    if mallopt is None:
        return False
    # The mmap threshold first: setting either one ends glibc's own adjustment of both.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def release_free(trim: Callable[[int], int] | None = None) -> bool:
    """Give the kernel back the free memory the start left in the heap (freed between
    what imports, the configuration and the app keep), once, when serving begins:
    1 MiB of the idle RSS here, and a few hundred KiB of the peak while streaming
    (docs/performance.md, "What each change bought": the heap the start leaves). Whether
    it ran."""
    trim = trim or glibc_malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
