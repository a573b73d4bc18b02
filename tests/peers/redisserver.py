"""A throwaway ``redis-server`` on 127.0.0.1, for proxyd's shared small-response cache.

``RedisServer(dir).start()`` runs ``redis-server`` on a free port with persistence
off (``--save "" --appendonly no``) and its working directory and log in ``dir``,
then waits until it answers ``PING``.  ``stop()`` (or leaving the ``with`` block)
terminates it; ``freeze()`` and ``resume()`` stop and continue it (SIGSTOP,
SIGCONT).  ``command("HLEN", key)`` sends one command and returns the reply's
first line, enough for tests to look at what proxyd stored.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from tests.peers import (
    LOOPBACK,
    Listening,
    PeerError,
    free_port,
    require_binary,
    stop_process,
)
from tests.peers.children import popen

START_TIMEOUT = 10.0


class RedisServer(Listening):
    """redis-server on a free port of the loopback, its data in ``workdir``."""

    peer = "redis-server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "redis.log"
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, as proxyd's ``[cache] redis_url`` takes it."""
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        binary = require_binary("redis-server")
        for _attempt in range(3):
            self._port = free_port()
            argv = [binary, "--bind", LOOPBACK, "--port", str(self._port)]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
            argv += ["--protected-mode", "yes", "--daemonize", "no"]
            with self.log_path.open("ab") as log:
                self._proc = popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir
                )
            deadline = time.monotonic() + timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                try:
                    if self.command("PING") == "+PONG":
                        return self
                except OSError:
                    pass
                time.sleep(0.05)
            self.stop()
            log_text = self.log_path.read_text(errors="replace")
            if "address already in use" not in log_text.lower():
                raise PeerError(f"redis-server did not answer PING within {timeout}s:\n{log_text}")
        raise PeerError("redis-server: no free port after 3 attempts")

    def stop(self) -> None:
        if self._proc is not None:
            self.resume()  # a stopped process would take SIGTERM only once continued
            stop_process(self._proc)
            self._proc = None

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets (the kernel still accepts connections)
        but answers nothing, as a Redis stuck on a swapped-out page or a full disk."""
        assert self._proc is not None, "a started redis-server"
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: the frozen server answers again."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def command(self, *args: str, timeout: float = 2.0) -> str:
        """Send one command (RESP); return the first line of the reply (``+PONG``, ``:3``)."""
        request = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            request += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as sock:
            sock.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[0].decode(errors="replace")
