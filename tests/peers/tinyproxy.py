"""A throwaway forward proxy: Debian's ``tinyproxy``, as a corporate network's.

``TinyProxy(dir).start()`` runs ``tinyproxy -d`` (in the foreground) with a config
file of its own in ``dir``: ``Listen`` on 127.0.0.1 (or, given a ``NetNamespace``,
on that namespace's address, inside it), a free ``Port``, ``LogLevel Connect`` so
that its log names every request it forwarded (``GET http://host/path`` for plain
HTTP, ``CONNECT host:port`` for a tunnel), and optionally ``BasicAuth USER PASS``
(tinyproxy 1.10+), which it asks of every client with a 407. It answers CONNECT to
any port (no ``ConnectPort`` line) and strips ``Proxy-Authorization`` before it
forwards a request. ``stop()`` (or leaving the ``with`` block) terminates it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.peers import LOOPBACK, PeerError, free_port, require_binary, stop_process
from tests.peers.children import popen
from tests.peers.netns import NetNamespace

START_TIMEOUT = 10.0
# `CONNECT   Dec 02 01:56:32.615 [29375]: Request (file descriptor 5): GET http://… HTTP/1.1`
_REQUEST = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


@dataclass(frozen=True)
class Forwarded:
    """One request the proxy took: `GET` and an absolute URL, or `CONNECT host:port`."""

    method: str
    target: str


class TinyProxy:
    peer = "tinyproxy"

    def __init__(
        self,
        workdir: Path,
        *,
        netns: NetNamespace | None = None,
        basic_auth: tuple[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.basic_auth = basic_auth
        self.log_path = workdir / "tinyproxy.log"
        self.address = LOOPBACK
        if netns is not None:
            if netns.address is None:
                raise PeerError("tinyproxy in a namespace needs its veth address")
            self.address = netns.address
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`http://ADDRESS:PORT`, as HTTPS_PROXY or a hosts.toml `proxy` names it."""
        return f"http://{self.address}:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        binary = require_binary("tinyproxy")
        self.port = free_port()
        config = self.workdir / "tinyproxy.conf"
        lines = [
            f"Port {self.port}",
            f"Listen {self.address}",
            "Timeout 60",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            "MaxClients 64",
        ]
        if self.basic_auth is not None:
            lines.append("BasicAuth {} {}".format(*self.basic_auth))
        config.write_text("\n".join(lines) + "\n")
        argv = [binary, "-d", "-c", str(config)]
        if self.netns is not None:
            argv = self.netns.argv(argv)
        with (self.workdir / "tinyproxy.out").open("ab") as out:
            self._proc = popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with socket.create_connection((self.address, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        output = (self.workdir / "tinyproxy.out").read_text(errors="replace")
        raise PeerError(f"tinyproxy did not listen on {self.url} within {timeout}s:\n{output}")

    def forwarded(self) -> list[Forwarded]:
        """Every request the proxy has taken so far, from its log."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text(errors="replace")
        return [Forwarded(m[1], m[2]) for m in _REQUEST.finditer(text)]

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
