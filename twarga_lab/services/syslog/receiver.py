"""The network receiver: syslog over UDP (one message per datagram) and TCP (RFC 6587
octet counting or one message per line), with a bound on clients, frames and silence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from twarga_lab.services.syslog.ingest import SyslogIngest
from twarga_lab.services.syslog.trust import Origin
from twarga_lab.services.syslog_format import MAX_LINE

log = logging.getLogger(__name__)


MAX_TCP_CLIENTS = 64
MAX_FRAME = 64 * 1024


def split_lines(buffer: bytearray, feed: Callable[[bytes], None]) -> None:
    """Feed every complete line of ``buffer`` and keep the rest; an over-long line is cut."""
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            if len(buffer) > MAX_LINE:
                feed(bytes(buffer[:MAX_LINE]))
                del buffer[:]
            return
        line = bytes(buffer[:end]).rstrip(b"\r\x00")
        del buffer[: end + 1]
        if line:
            feed(line[:MAX_LINE])


class _UDPProtocol(asyncio.DatagramProtocol):
    def __init__(self, ingest: SyslogIngest) -> None:
        self.ingest = ingest

    def datagram_received(self, data: bytes, addr: Any) -> None:
        origin = Origin("udp", peer=str(addr[0]))
        for line in data.split(b"\n"):
            line = line.rstrip(b"\r\x00")
            if line:
                self.ingest.feed(origin, line[:MAX_LINE])


class SyslogReceiver:
    """UDP and TCP syslog on one address; a TCP client silent (or stuck in the middle of
    a message) for ``tcp_timeout`` seconds is disconnected."""

    def __init__(
        self, ingest: SyslogIngest, host: str, port: int, *, tcp_timeout: float = 60.0
    ) -> None:
        self.ingest = ingest
        self.host = host
        self.port = port
        self.tcp_timeout = tcp_timeout
        self.udp_port: int | None = None
        self.tcp_port: int | None = None
        self.timeouts = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind both sockets; with port 0 each gets its own free port."""
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(
            lambda: _UDPProtocol(self.ingest), local_addr=(self.host, self.port)
        )
        self.udp_port = self._udp.get_extra_info("sockname")[1]
        self._tcp = await asyncio.start_server(self._client, self.host, self.port)
        self.tcp_port = self._tcp.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for task in list(self._clients):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._clients) >= MAX_TCP_CLIENTS or task is None:
            writer.close()
            return
        self._clients.add(task)
        peer = writer.get_extra_info("peername")
        origin = Origin("tcp", peer=str(peer[0]) if peer else None)
        loop = asyncio.get_running_loop()
        buffer = bytearray()
        partial_since: float | None = None  # when the unfinished message began
        try:
            while True:
                now = loop.time()
                timeout = self.tcp_timeout
                if partial_since is not None:
                    timeout = max(0.0, partial_since + self.tcp_timeout - now)
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), timeout)
                except TimeoutError:
                    self.timeouts += 1
                    log.info(
                        "syslog: closing TCP connection from %s after %g s without a "
                        "complete message", origin.peer, self.tcp_timeout,
                    )  # fmt: skip
                    break
                if not chunk:
                    break
                before = len(buffer) + len(chunk)
                buffer += chunk
                if not self._frames(buffer, origin):
                    break  # a broken octet count: the stream cannot be resynchronised
                if not buffer:
                    partial_since = None
                elif partial_since is None or len(buffer) < before:
                    partial_since = loop.time()  # a message completed; a new one began
        except (ConnectionError, asyncio.CancelledError):
            pass  # the sender went away or we are stopping: what arrived is kept
        finally:
            self._clients.discard(task)
            writer.close()

    def _frames(self, buffer: bytearray, origin: Origin) -> bool:
        """Feed the complete messages of ``buffer``; False when the framing is broken."""
        while buffer:
            if buffer[:1].isdigit():  # RFC 6587 octet counting: "LEN SP MSG"
                space = buffer.find(b" ", 0, 7)
                if space < 0:
                    return len(buffer) < 7
                length = int(buffer[:space]) if buffer[:space].isdigit() else -1
                if not 0 < length <= MAX_FRAME:
                    return False
                if len(buffer) < space + 1 + length:
                    return True
                message = bytes(buffer[space + 1 : space + 1 + length])
                del buffer[: space + 1 + length]
                for line in message.split(b"\n"):
                    if line.strip():
                        self.ingest.feed(origin, line.rstrip(b"\r\x00")[:MAX_LINE])
            else:  # non-transparent framing: one message per line
                end = buffer.find(b"\n")
                if end < 0:
                    return len(buffer) <= MAX_FRAME
                line = bytes(buffer[:end]).rstrip(b"\r\x00")
                del buffer[: end + 1]
                if line:
                    self.ingest.feed(origin, line[:MAX_LINE])
        return True
