"""A pipelining client in a process of its own, for tests/test_fastpath.py.

On one keep-alive connection it sends, again and again, a request proxyd must hand to
aiohttp and then, after a delay of a few microseconds (spread over `max_delay_us`), a
request proxyd answers from memory; then it reads both answers and checks that they
came back in the order asked (by their X-Request-Id). It runs in its own process so
that its delays are real ones, not the test's event loop turning: the second request
then lands at every point of the first one's handling, including the loop turn
between aiohttp taking the first off its queue and starting to handle it.

`python -m tests.racer PORT FIRST_PATH HOT_PATH TRIES MAX_DELAY_US` prints one JSON
object: {"tries": ..., "out_of_order": ..., "wrong": ...}.
"""

from __future__ import annotations

import json
import socket
import sys
import time

TIMEOUT = 10.0  # seconds any one read may take: the whole run is bounded


def request(path: str, request_id: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxyd\r\nX-Request-Id: {request_id}\r\n\r\n".encode()


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("proxyd closed the connection")
        self.buffer += chunk

    def response(self) -> tuple[int, str]:
        """The status and X-Request-Id of the next response (its body skipped)."""
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        self.buffer = self.buffer[length:]
        return int(status_line.split(" ")[1]), headers.get("x-request-id", "")


def race(port: int, first: str, hot: str, tries: int, max_delay_us: int) -> dict[str, int]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = Reader(sock)
    out_of_order = wrong = 0
    for i in range(tries):
        delay_ns = (i * 7919 % (max_delay_us + 1)) * 1000  # every delay, in no order
        sock.sendall(request(first, f"first-{i}"))
        start = time.perf_counter_ns()
        while time.perf_counter_ns() - start < delay_ns:
            pass
        sock.sendall(request(hot, f"hot-{i}"))
        answers = [reader.response(), reader.response()]
        ids = [request_id for _, request_id in answers]
        if ids == [f"hot-{i}", f"first-{i}"]:
            out_of_order += 1
        elif ids != [f"first-{i}", f"hot-{i}"] or any(s != 200 for s, _ in answers):
            wrong += 1
    sock.close()
    return {"tries": tries, "out_of_order": out_of_order, "wrong": wrong}


if __name__ == "__main__":
    port, first, hot, tries, max_delay = sys.argv[1:6]
    print(json.dumps(race(int(port), first, hot, int(tries), int(max_delay))))
