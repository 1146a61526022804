"""The host side of a guest's control channel (virtio-serial port ``org.twarga.control.0``).

QEMU listens on the channel's UNIX socket (``ChannelSpec`` with mode ``bind``; the live
domain XML names it, :func:`twarga_lab.virt.domain.channel_socket_path`). The tiny image's
``twarga-guard`` reads ``ban ADDR`` / ``unban ADDR`` lines from it, applies them (a
``prohibit`` policy rule for everything from ADDR), logs ``twarga-guard: banned ADDR`` to
syslog and answers ``ok ban ADDR`` on the port. :func:`send_control_line` blocks until that
answer: services call it in a thread.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

from twarga_lab.errors import BackendError

__all__ = ["CONTROL_LINE_RE", "ControlTimeout", "send_control_line"]

_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
#: What the guest accepts: a verb and a dotted IPv4 address (no leading zeros).
CONTROL_LINE_RE = re.compile(rf"(ban|unban) {_OCTET}(\.{_OCTET}){{3}}")


class ControlTimeout(BackendError):
    """The guest did not acknowledge a control line in time (not booted yet, or no guard)."""


def send_control_line(socket_path: str | Path, line: str, timeout: float = 5) -> None:
    """Send ``line`` (``ban A.B.C.D`` or ``unban A.B.C.D``) to the guest and wait until it
    answers ``ok <line>``.

    Raises ValueError for any other line, BackendError when the socket cannot be reached
    (the domain is not running), ControlTimeout when no answer comes within ``timeout``.
    """
    if not isinstance(line, str) or not CONTROL_LINE_RE.fullmatch(line):
        raise ValueError(f"bad control line {line!r}: 'ban|unban A.B.C.D'")
    wanted = f"ok {line}".encode()
    deadline = time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise BackendError(f"no socket for the control channel: {exc}") from exc
    with sock:
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(str(socket_path))
            sock.sendall(line.encode() + b"\n")
        except OSError as exc:
            raise BackendError(f"control channel {socket_path} unreachable: {exc}") from exc
        buffer = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlTimeout(f"the guest did not acknowledge {line!r} in {timeout}s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue  # the deadline check above raises
            except OSError as exc:
                raise BackendError(f"control channel {socket_path} failed: {exc}") from exc
            if not chunk:
                raise BackendError(f"control channel {socket_path} closed before the answer")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            # Answers to earlier lines (from a connection that closed early) are skipped.
            if any(reply.strip() == wanted for reply in lines):
                return
            if len(buffer) > 4096:
                buffer = b""
