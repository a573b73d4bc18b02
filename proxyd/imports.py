"""Importing a library without an optional module it would load by itself for
nothing proxyd needs, megabytes of every daemon's memory:

- structlog imports rich whenever rich is installed, for pretty console tracebacks
  (~4 MiB). proxyd depends on rich for `proxyd prefetch`'s progress bars, which
  import it where they are drawn.
- frozenlist (aiohttp's) prefers its C++ extension, which loads libstdc++ (~1 MiB),
  for the lists aiohttp freezes at startup (an app's middlewares and signals); its
  pure-Python twin is the same class, iterated once per request.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


def without(module: str, *hidden: str) -> ModuleType:
    """`import module` with each of `hidden` not importable meanwhile (the library's
    `try: import X except ImportError` takes the path without it). A hidden package
    that is imported already is left as it is: there is nothing to save then. After
    this, `hidden` import as usual again."""
    blocked = [name for name in hidden if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        return importlib.import_module(module)
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
