"""Which requests to a fake upstream belong to the test that started it.

A fake listens on a free port that another process may have used a moment before:
another suite's readiness probe or a proxyd of its own, still retrying there, can send
it a request. The test's own requests come from this process (the proxyd under test
runs in it) or from a process it started (a proxyd or tinyproxy subprocess, a client),
so a request counts when the TCP connection it came on was opened by one of those.
Anything else is answered 404 and not recorded: "the upstream saw nothing" stays as
strict about proxyd as it was, a /v2/ ping included, without failing on strays.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Address = tuple[str, int]

# sock_diag (linux/inet_diag.h): one socket looked up by its addresses, in microseconds;
# reading /proc/PID/net/tcp walks the whole table (milliseconds a request).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NLMSG_HEADER = struct.Struct("=IHHII")
DIAG_REQUEST = struct.Struct("=BBBxI")  # family, protocol, ext, states
SOCKID = struct.Struct("!HH16s16s")  # sport, dport, src, dst; then if, cookie[2]
SOCKID_TAIL = struct.Struct("=III")
NO_COOKIE = 0xFFFFFFFF
# inet_diag_msg: family, state, timer, retrans; the sockid; expires, rqueue, wqueue, uid;
# then the inode.
INODE_AT = NLMSG_HEADER.size + 4 + SOCKID.size + SOCKID_TAIL.size + 4 * 4


def _inode_of(local: Address, remote: Address) -> int | None:
    """The inode of the TCP socket with these ends in this network namespace."""
    ip = ipaddress.ip_address(local[0])
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sockid = SOCKID.pack(
        local[1],
        remote[1],
        ip.packed.ljust(16, b"\0"),
        ipaddress.ip_address(remote[0]).packed.ljust(16, b"\0"),
    ) + SOCKID_TAIL.pack(0, NO_COOKIE, NO_COOKIE)
    body = DIAG_REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    header = NLMSG_HEADER.pack(
        NLMSG_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0
    )
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(1.0)
        diag.send(header + body)
        answer = diag.recv(4096)
    kind = NLMSG_HEADER.unpack_from(answer)[1]
    if kind == NLMSG_ERROR or len(answer) < INODE_AT + 4:
        return None  # no such socket here (closed, or in another namespace)
    return int(struct.unpack_from("=I", answer, INODE_AT)[0])


def _holds(pid: int, inode: int) -> bool:
    """``pid`` has the socket ``inode`` open."""
    wanted = f"socket:[{inode}]"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _local_addresses(pid: int) -> set[Address]:
    """The local (address, port) of each TCP socket ``pid`` holds, read from its own
    network namespace's tables: for a process in a namespace of the test's (tinyproxy
    behind a veth pair), which sock_diag here cannot see."""
    proc = f"/proc/{pid}"
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"{proc}/fd"):
            try:
                target = os.readlink(f"{proc}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        tables = [Path(f"{proc}/net/{table}").read_text() for table in ("tcp", "tcp6")]
    except OSError:  # gone, or not ours to read
        return set()
    found: set[Address] = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                found.add(_address(fields[1]))
    return found


def _address(field: str) -> Address:
    """``0100007F:1F90`` (the kernel's bytes in host order) as ("127.0.0.1", 8080)."""
    hexip, hexport = field.split(":")
    raw = bytes.fromhex(hexip)
    # Each 32-bit word is in the host's (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(hexport, 16))


def ours(request: web.Request) -> bool:
    """The request came on a connection opened by this process or a descendant."""
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport else None
    here = transport.get_extra_info("sockname") if transport else None
    if not isinstance(peer, tuple) or not isinstance(here, tuple):
        return True  # not TCP: nothing to tell, so as before
    client, server = (str(peer[0]), int(peer[1])), (str(here[0]), int(here[1]))
    this = psutil.Process()
    inode = _inode_of(client, server)
    if inode is not None:
        if _holds(this.pid, inode):
            return True
        return any(_holds(child.pid, inode) for child in this.children(recursive=True))
    children = this.children(recursive=True)
    return any(client in _local_addresses(child.pid) for child in children)


@web.middleware
async def only_ours(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A fake's middleware: a stray request never reaches the fake (nor its ``seen``)."""
    if not ours(request):
        return web.Response(status=404, text="not a request of this test\n")
    return await handler(request)
