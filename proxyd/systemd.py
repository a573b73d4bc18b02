"""What proxyd needs of systemd, without a dependency: readiness notification
(`sd_notify`) and socket activation (`sd_listen_fds`).

Both read the environment they are given (the process's by default), so tests need no
patching. Outside systemd both do nothing: no `NOTIFY_SOCKET`, no `LISTEN_FDS`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, MutableMapping

SD_LISTEN_FDS_START = 3  # the first inherited descriptor, by systemd's protocol


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send `state` (`READY=1`, `STOPPING=1`, `STATUS=…`; several joined by newlines)
    to the service manager; True when it was sent.

    `NOTIFY_SOCKET` is a datagram socket's path, or, starting with `@`, a name in the
    abstract namespace. A failure to send is no reason to stop serving: it returns
    False.
    """
    address = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def listen_fds(
    env: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[socket.socket]:
    """The listening sockets systemd passed (`LISTEN_FDS` from fd 3), or [] when
    none were passed to this process (`LISTEN_PID` names another one).

    As `sd_listen_fds(1)`, it removes `LISTEN_PID`, `LISTEN_FDS` and
    `LISTEN_FDNAMES` from `env`, and marks the descriptors close-on-exec, so no child
    process takes them for its own. A descriptor that is no listening stream socket
    is a `ValueError`.
    """
    env = os.environ if env is None else env
    try:
        if int(env.get("LISTEN_PID", "")) != (os.getpid() if pid is None else pid):
            return []
        count = int(env.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0)):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(f"inherited file descriptor {fd}: {exc.strerror}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise ValueError(f"inherited file descriptor {fd} is not a listening stream socket")
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
