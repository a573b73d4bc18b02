"""proxyd: a local registry proxy daemon for container images."""

from proxyd.imports import without

__version__ = "0.1.0"

# Before any module of proxyd imports structlog: without rich, which structlog loads
# only for its console tracebacks (proxyd.imports says why). Console log lines show
# plain tracebacks, as JSON lines always did.
without("structlog", "rich")
