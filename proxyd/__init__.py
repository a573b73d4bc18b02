"""proxyd: a local registry proxy daemon for container images."""

__version__ = "0.1.0"
