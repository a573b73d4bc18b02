"""proxyd: a local registry proxy daemon for container images."""

from proxyd.imports import without

__version__ = "0.1.0"

# Before any module of proxyd imports them (proxyd.imports says why): structlog
# without rich, which it loads only for its console tracebacks (console log lines show
# plain tracebacks, as JSON lines always did), and aiohttp's frozenlist without its
# C++ extension.
without("structlog", "rich")
without("frozenlist", "frozenlist._frozenlist")
