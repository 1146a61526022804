"""VM consoles: who may open one, how it is attached, and the events it leaves.

A console is the VM's serial console over a libvirt stream (``virDomain.openConsole``
with ``VIR_DOMAIN_CONSOLE_FORCE``, see ``virt.console_stream``): it reaches only that
VM's serial line, never a host shell, runs no ``virsh`` subprocess, and a new session
takes over from an old one. The live sessions (one per VM, takeover, idle culling)
are kept by ``VMConsoleManager`` here; the websocket side lives in ``handlers.console``
and reaches this module only through the ``ConsoleSocket`` protocol (no tornado here).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from traitlets import Float
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.errors import Conflict
from twarga_lab.services import Identity
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms import VMService
from twarga_lab.virt.backend import ConsoleChannel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsoleTarget:
    """A console a user may open: the VM and its libvirt domain."""

    vm_id: int
    vm_name: str
    owner: str
    domain: str

    @property
    def session_name(self) -> str:
        """One session per VM: a new one replaces the old."""
        return f"vm-{self.vm_id}"


class ConsoleService(LoggingConfigurable):
    """Authorises console sessions and records their opening and closing."""

    def __init__(self, db: Database, vms: VMService, libvirt_uri: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.vms = vms
        self.libvirt_uri = libvirt_uri

    async def authorize(self, identity: Identity, vm_id: int) -> ConsoleTarget:
        """The console of a running VM the caller owns (admins: any); NotFound otherwise."""
        vm = await self.vms.get(identity, vm_id)
        if vm["status"] != "running":
            raise Conflict(f"VM {vm['name']} is {vm['status']}: start it first", "vm_not_running")
        return ConsoleTarget(vm_id, vm["name"], vm["owner"], vm["domain"])

    def attach(
        self,
        target: ConsoleTarget,
        on_output: Callable[[bytes], None],
        on_closed: Callable[[str], None],
    ) -> ConsoleChannel:
        """Attach to the VM's serial console, taking it over (blocks: call from a thread).

        Returns a stream with ``write(bytes)`` and ``close()``; ``on_output`` and
        ``on_closed(reason)`` are called from the hypervisor's event thread.
        """
        return self.vms.backend.open_console(target.domain, on_output, on_closed)

    def record(
        self, identity: Identity, target: ConsoleTarget, action: str, **details: object
    ) -> None:
        """An ``console_open`` or ``console_close`` event."""
        words = "opened" if action == "console_open" else "closed"
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.info,
                f"console of VM {target.vm_name} {words} by {identity.name}",
                user_name=target.owner, vm_id=target.vm_id, action=action,
                actor=identity.name, **details,
            )  # fmt: skip


class _Connection(Protocol):
    def is_closing(self) -> bool: ...


class ConsoleSocket(Protocol):
    """What a session needs of its websocket (``handlers.console.VMConsoleSocket``)."""

    @property
    def ws_connection(self) -> _Connection | None:
        """The live connection, None once the socket has closed."""

    def send_json(self, message: list[Any]) -> asyncio.Future[None] | None:
        """Send one message; the future resolves once it is flushed (None: closed)."""

    def end(self, reason: str) -> None:
        """The session is over: tell the browser and close."""


Attach = Callable[[ConsoleTarget, Callable[[bytes], None], Callable[[str], None]], ConsoleChannel]


class ConsoleSession:
    """One socket attached to one VM's console stream; lives on the server's event loop.

    Output the browser has not taken yet is bounded: above ``high_water`` characters
    written but not flushed, reading the guest pauses until they fall below ``low_water``.
    """

    high_water = 256 * 1024
    low_water = 64 * 1024

    def __init__(self, target: ConsoleTarget, socket: ConsoleSocket) -> None:
        self.target = target
        self.socket = socket
        self.stream: ConsoleChannel | None = None
        self.last_input = time.monotonic()
        self.ended = False
        self.unflushed = 0
        self.paused = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held: list[bytes] | None = []  # output before the socket is ready for it

    @property
    def name(self) -> str:
        return self.target.session_name

    def ready(self) -> None:
        """The socket has shown the banner: pass on what the guest printed meanwhile."""
        held, self._held = self._held or [], None
        for data in held:
            self.deliver(data)

    def deliver(self, data: bytes) -> None:
        if self.ended:
            return
        if self._held is not None:
            self._held.append(data)
            return
        text = self._decoder.decode(data)
        if not text:
            return
        flushed = self.socket.send_json(["stdout", text])
        if flushed is None:
            return
        size = len(text)
        self.unflushed += size
        flushed.add_done_callback(lambda _: self._flushed(size))
        if self.unflushed > self.high_water and not self.paused:
            self.paused = True
            self.stream.set_reading(False)

    def _flushed(self, size: int) -> None:
        self.unflushed -= size
        if self.paused and self.unflushed < self.low_water and not self.ended:
            self.paused = False
            self.stream.set_reading(True)

    def write(self, text: str) -> None:
        if self.stream is not None and not self.ended:
            self.stream.write(text.encode("utf-8", errors="replace"))


class VMConsoleManager(LoggingConfigurable):
    """The live console sessions, one per VM, their idle culler and their event tasks."""

    idle_timeout = Float(
        1800.0, help="Seconds without input after which a VM console session is closed."
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sessions: dict[str, ConsoleSession] = {}
        self.background: set[asyncio.Future[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._culler: asyncio.Task[None] | None = None

    def keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a background task until it is done (shutdown waits for them)."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def take_over(
        self, target: ConsoleTarget, socket: ConsoleSocket, attach: Attach
    ) -> ConsoleSession:
        """Attach ``socket`` to the VM's console, ending the session that had it.

        Raises what ``attach`` raises (the VM stopped meanwhile, no console).
        """
        name = target.session_name
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self.sessions.pop(name, None)
            if old is not None:
                await self.end(old, "taken over by a new session")
            session = ConsoleSession(target, socket)
            loop = asyncio.get_running_loop()

            def on_output(data: bytes) -> None:  # libvirt's event thread
                loop.call_soon_threadsafe(session.deliver, data)

            def on_closed(reason: str) -> None:  # libvirt's event thread
                loop.call_soon_threadsafe(self._ended_by_itself, session, reason)

            session.stream = await asyncio.to_thread(attach, target, on_output, on_closed)
            if socket.ws_connection is None or socket.ws_connection.is_closing():
                # The browser left while the console was being attached.
                await self.end(session, "closed by the client")
                raise ConsoleGone()
            self.sessions[name] = session
            return session

    def _ended_by_itself(self, session: ConsoleSession, reason: str) -> None:
        self.keep(asyncio.ensure_future(self.end(session, reason)))

    async def end(self, session: ConsoleSession, reason: str) -> None:
        """Detach the session and close its socket (``["disconnect", 1]`` first)."""
        if session.ended:
            return
        session.ended = True
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
        session.socket.end(reason)
        if session.stream is not None:
            # Aborting a stream is a round trip to libvirtd: not on the event loop.
            await asyncio.to_thread(session.stream.close)

    def touch(self, session: ConsoleSession) -> None:
        """The user typed something: the session is not idle."""
        session.last_input = time.monotonic()

    async def cull_idle(self) -> list[str]:
        """Close every session idle for longer than the timeout; returns their names."""
        now = time.monotonic()
        idle = [s for s in self.sessions.values() if now - s.last_input > self.idle_timeout]
        for session in idle:
            await self.end(session, "idle")
        return [s.name for s in idle]

    def start_culler(self) -> None:
        if self._culler is None:
            self._culler = asyncio.ensure_future(self._cull_forever())

    async def _cull_forever(self) -> None:
        period = max(0.5, min(30.0, self.idle_timeout / 3))
        while True:
            await asyncio.sleep(period)
            try:
                await self.cull_idle()
            except Exception:
                log.exception("console culling failed")

    async def shutdown(self) -> None:
        if self._culler is not None:
            self._culler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._culler
            self._culler = None
        for session in list(self.sessions.values()):
            await self.end(session, "the server is shutting down")
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)


class ConsoleGone(Exception):
    """The socket closed before its console was attached."""
