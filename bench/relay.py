"""An HTTP relay in front of a registry, run as its own process.

It stands for the network between a proxy and its upstream, in three roles:

- a slow upstream: ``--rate`` paces every response body (bytes per second, per
  connection), so a proxy that buffers a whole blob before sending shows it in its
  time to first byte;
- a shared link: ``--total-rate`` paces the response bodies of all connections
  together (bytes per second for the sum), as a WAN link a fleet of nodes shares;
- a witness: it counts the requests it relays (``GET /_relay/stats``), which tells
  how many GETs of one blob a proxy sent upstream, and the bytes of the response
  bodies it relayed (``GET /_relay/bytes``), which tells how much crossed the link;
- one address for a registry and its token server (``--token-target``): drayage
  refuses a token realm on another host or port than its upstream.

Standing for the network, it should cost the machine as little as it can: proxies,
clients and registries share the same two cores, and a relay that copies every byte
through Python takes CPU from whichever of them is busiest, the proxy under test most
often. So it reads and rewrites only the heads of requests and responses; bodies of a
known length move from socket to socket with ``splice(2)`` through a pipe, never
entering the process (an aiohttp relay took 0.11-0.20 s of CPU per pull of the
81 MiB image; this one takes a few hundredths). One thread serves each connection,
with blocking sockets: no event loop is on the way of a byte.

Every request head is parsed (so each one is counted and routed: ``/token`` to the
token server, the rest to the registry); ``Host`` is rewritten to the target's. A
request body must have a Content-Length (nothing benchmarked sends a chunked one);
a chunked response is passed on chunk by chunk.

It listens on 127.0.0.1 only, prints ``LISTENING <port>`` once bound, and exits when
its parent dies or ``--max-seconds`` pass.

    python -m bench.relay --target http://127.0.0.1:5000 [--rate 4194304] [--total-rate N]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import socket
import struct
import sys
import threading
import time
from urllib.parse import urlsplit

CHUNK = 64 * 1024  # the step of a paced body
PIPE_SIZE = 1 << 20  # bytes one splice may move at a time
READ_TIMEOUT = 120.0  # seconds a peer may stay silent in the middle of a message
MAX_HEAD = 64 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class Closed(Exception):
    """The peer closed the connection (at a message boundary: nothing to report)."""


class Conn:
    """A blocking socket with a read buffer for heads: what a head read past its end
    is the start of the body, handed on before the rest is spliced."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        # Blocking, as splice needs it; the kernel's own timeouts bound every wait.
        sock.settimeout(None)
        timeval = struct.pack("ll", int(READ_TIMEOUT), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, address: tuple[str, int]) -> Conn:
        return cls(socket.create_connection(address, timeout=10))

    def read_head(self) -> bytes:
        return self._read_until(b"\r\n\r\n", head=True)

    def read_line(self) -> bytes:
        return self._read_until(b"\r\n")

    def _read_until(self, marker: bytes, *, head: bool = False) -> bytes:
        """What comes before `marker` (consumed); the rest stays buffered."""
        while marker not in self.buffer:
            if head and (
                len(self.buffer) > MAX_HEAD or (self.buffer and not self.buffer[:1].isalpha())
            ):
                # Not HTTP (skopeo tries TLS first): an answer at once lets it fall back.
                self.sock.sendall(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                raise ValueError("not an HTTP request head")
            data = self.sock.recv(65536)
            if not data:
                raise Closed
            self.buffer += data
        part, _, self.buffer = self.buffer.partition(marker)
        return part

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes already buffered."""
        data, self.buffer = self.buffer[:limit], self.buffer[limit:]
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def render(first: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first, *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


class Link:
    """A bandwidth every connection shares: each step of a body books the link's next
    free moment and waits for it, so the sum of all bodies moves at ``rate`` bytes per
    second whatever the number of connections (in the order the steps came; an idle
    link saves no credit for a burst)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._free_at = 0.0
        self._lock = threading.Lock()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + nbytes / self.rate
            until = self._free_at
        ahead = until - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


class Relay:
    def __init__(
        self, target: str, token_target: str | None, rate: float, total_rate: float = 0.0
    ) -> None:
        self.target = self._address(target)
        self.token_target = self._address(token_target) if token_target else None
        self.rate = rate
        self.link = Link(total_rate) if total_rate > 0 else None
        self.counts: collections.Counter[str] = collections.Counter()
        self.body_bytes = 0  # of the responses relayed (what crossed the link)
        self._lock = threading.Lock()

    @staticmethod
    def _address(url: str) -> tuple[str, int]:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        return parts.hostname, parts.port

    def serve(self, listener: socket.socket) -> None:
        while True:
            client, _ = listener.accept()
            threading.Thread(target=self.connection, args=(client,), daemon=True).start()

    def connection(self, client_sock: socket.socket) -> None:
        client = Conn(client_sock)
        upstreams: dict[tuple[str, int], Conn] = {}
        pipe = os.pipe()
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
        try:
            while self.exchange(client, upstreams, pipe):
                pass
        except (Closed, OSError, ValueError):
            pass  # a peer went away or spoke nonsense: the connection ends, as a network's would
        finally:
            client.close()
            for upstream in upstreams.values():
                upstream.close()
            os.close(pipe[0])
            os.close(pipe[1])

    def exchange(
        self, client: Conn, upstreams: dict[tuple[str, int], Conn], pipe: tuple[int, int]
    ) -> bool:
        """One request and its response; whether the connection goes on."""
        first, headers = parse_head(client.read_head())
        method, target, _version = first.split(" ", 2)
        path = target.split("?", 1)[0]
        with self._lock:
            self.counts[f"{method} {path}"] += 1
        if path in ("/_relay/stats", "/_relay/reset", "/_relay/bytes"):
            return self.own(client, path)
        if header(headers, "transfer-encoding") is not None:
            client.sock.sendall(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
            return False
        address = self.token_target if self.token_target and path == "/token" else self.target
        headers = [(k, v) for k, v in headers if k.lower() != "host"]
        headers.insert(0, ("Host", f"{address[0]}:{address[1]}"))
        request_length = int(header(headers, "content-length") or 0)

        head = render(first, headers)
        upstream = upstreams.get(address)
        fresh = upstream is None
        if upstream is None:
            upstream = upstreams[address] = Conn.connect(address)
        try:
            upstream.sock.sendall(head)
            if request_length:
                self.forward(client, upstream, request_length, pipe, response=False)
            status, response = parse_head(upstream.read_head())
        except (ConnectionError, Closed):
            if fresh or request_length:  # a body cannot be sent twice
                raise
            # The registry closed a kept-alive connection: once more, on a new one.
            upstream.close()
            upstream = upstreams[address] = Conn.connect(address)
            upstream.sock.sendall(head)
            status, response = parse_head(upstream.read_head())
        client.sock.sendall(render(status, response))
        code = int(status.split(" ", 2)[1])
        keep = (header(response, "connection") or "").lower() != "close"
        if method == "HEAD" or code in (204, 304) or 100 <= code < 200:
            pass
        elif (length := header(response, "content-length")) is not None:
            self.forward(upstream, client, int(length), pipe, response=True)
        elif (header(response, "transfer-encoding") or "").lower() == "chunked":
            self.forward_chunked(upstream, client)
        else:  # the body ends where the registry closes the connection
            self.forward(upstream, client, None, pipe, response=True)
            return False
        if not keep:
            upstreams.pop(address).close()
        keep_client = (header(headers, "connection") or "").lower() != "close"
        return keep_client

    def own(self, client: Conn, path: str) -> bool:
        with self._lock:
            if path == "/_relay/reset":
                self.counts.clear()
            if path == "/_relay/bytes":
                body = json.dumps({"responses": self.body_bytes}).encode()
            else:
                body = json.dumps(dict(self.counts)).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        client.sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return True

    def forward(
        self, src: Conn, dst: Conn, length: int | None, pipe: tuple[int, int], *, response: bool
    ) -> None:
        """``length`` bytes (or all until the source closes) from ``src`` to ``dst``:
        what ``src`` buffered first, then the rest through the pipe. A response
        body is counted, and paced (per connection, on the shared link) as configured."""
        started, sent = time.monotonic(), 0
        buffered = src.take(length if length is not None else len(src.buffer))
        if buffered:
            dst.sock.sendall(buffered)
            sent += len(buffered)
            self._relayed(len(buffered), response=response)
        while length is None or sent < length:
            pace = response and (self.rate > 0 or self.link is not None)
            step = CHUNK if pace else PIPE_SIZE
            if length is not None:
                step = min(step, length - sent)
            moved = os.splice(src.sock.fileno(), pipe[1], step)
            if moved == 0:
                if length is None:
                    return
                raise Closed
            left = moved
            while left:
                left -= os.splice(pipe[0], dst.sock.fileno(), left)
            sent += moved
            self._relayed(moved, response=response)
            if response and self.rate > 0:
                ahead = started + sent / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)

    def _relayed(self, nbytes: int, *, response: bool) -> None:
        if not response:
            return
        with self._lock:
            self.body_bytes += nbytes
        if self.link is not None:
            self.link.wait(nbytes)

    @staticmethod
    def forward_chunked(src: Conn, dst: Conn) -> None:
        """A chunked body, copied through (small answers only: nothing large is sent
        this way by the registry or the token server)."""
        while True:
            line = src.read_line()
            size = int(line.split(b";", 1)[0], 16)
            dst.sock.sendall(line + b"\r\n")
            if size == 0:
                while True:  # trailers, up to the empty line
                    trailer = src.read_line()
                    dst.sock.sendall(trailer + b"\r\n")
                    if not trailer:
                        return
            data = b""
            while len(data) < size + 2:
                data += src.take(size + 2 - len(data)) or src.sock.recv(size + 2 - len(data))
            dst.sock.sendall(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="registry origin, http://127.0.0.1:PORT")
    parser.add_argument("--token-target", help="origin that answers /token")
    parser.add_argument("--rate", type=float, default=0.0, help="bytes per second, 0: no limit")
    parser.add_argument(
        "--total-rate", type=float, default=0.0, help="bytes per second of all connections"
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    for url in (args.target, args.token_target):
        if url is not None and not url.startswith("http://127.0.0.1:"):
            sys.exit(f"relay: refusing {url!r}; the benchmark only talks to 127.0.0.1")
    relay = Relay(args.target, args.token_target, args.rate, args.total_rate)
    listener = socket.create_server(("127.0.0.1", args.port), backlog=256)
    threading.Thread(target=relay.serve, args=(listener,), daemon=True).start()
    print(f"LISTENING {listener.getsockname()[1]}", flush=True)
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.5)


if __name__ == "__main__":
    main()
