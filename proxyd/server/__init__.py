"""The HTTP layer: parse the request, call the core, render the answer. No policy."""

from proxyd.server.app import create_app

__all__ = ["create_app"]
