"""The HTTP layer: parse the request, call the core, render the answer. No policy."""

from proxyd.server.app import create_app
from proxyd.server.middleware import AccessLogger

__all__ = ["AccessLogger", "create_app"]
