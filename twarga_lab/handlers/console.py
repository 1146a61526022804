"""``/twarga/api/vms/{id}/console``: a websocket on the VM's serial console.

It speaks terminado's protocol (``["stdin", text]`` and ``["set_size", rows, cols]`` in,
``["setup", {}]``, ``["stdout", text]`` and ``["disconnect", 1]`` out) over a libvirt
console stream (``services.consoles``): no ``virsh`` subprocess, nothing but the guest's
own output on the screen.

Before the socket is upgraded the request is checked completely: token not in the URL, a
websocket upgrade from an allowed Origin, authenticated, authorized (awaiting async
authorizers) and the caller owning (or administering) a running VM; refusals are JSON. Only
once the socket is open does the session take the console over from any other (one per
VM) and is the ``console_open`` event written. Sessions close after
``console_idle_timeout`` seconds without input, when the VM stops, and on ``^]``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import ensure_async
from tornado import web, websocket

from twarga_lab.errors import TwargaError
from twarga_lab.handlers.base import ScrubbedLogMixin
from twarga_lab.services import Identity
from twarga_lab.services.consoles import ConsoleTarget

log = logging.getLogger(__name__)

ESCAPE = "\x1d"  # ^], as in virsh console: leaves the session
Attach = Callable[[ConsoleTarget, Callable[[bytes], None], Callable[[str], None]], Any]


def websocket_refusal(handler: websocket.WebSocketHandler) -> tuple[int, str] | None:
    """What tornado would refuse the upgrade for, checked before anything else happens:
    ``(status, message)``, or None for a valid websocket request from an allowed Origin."""
    headers = handler.request.headers
    if headers.get("Upgrade", "").lower() != "websocket":
        return 400, "this is a websocket: send Upgrade: websocket"
    connection = [part.strip().lower() for part in headers.get("Connection", "").split(",")]
    if "upgrade" not in connection:
        return 400, 'the "Connection" header must be "Upgrade"'
    check_cross_origin = getattr(handler, "_check_cross_origin", None)
    if check_cross_origin is not None:
        error = check_cross_origin(handler.check_origin)
    else:  # tornado before 6.5: the Origin header alone
        origin = headers.get("Origin")
        error = None if origin is None or handler.check_origin(origin) else f"Origin {origin!r}"
    if error is not None:
        return 403, "cross-origin websockets are not allowed"
    if not all(headers.get(name) for name in ("Host", "Sec-WebSocket-Key")):
        return 400, "missing websocket headers"
    if headers.get("Sec-WebSocket-Version") != "13":
        return 426, "only websocket version 13 is spoken here"
    return None


class ConsoleSession:
    """One socket attached to one VM's console stream; lives on the server's event loop.

    Output the browser has not taken yet is bounded: above ``high_water`` characters
    written but not flushed, reading the guest pauses until they fall below ``low_water``.
    """

    high_water = 256 * 1024
    low_water = 64 * 1024

    def __init__(self, target: ConsoleTarget, socket: VMConsoleSocket) -> None:
        self.target = target
        self.socket = socket
        self.stream: Any = None
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


class VMConsoleManager:
    """The live console sessions, one per VM, their idle culler and their event tasks."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.sessions: dict[str, ConsoleSession] = {}
        self.background: set[asyncio.Future[Any]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._culler: asyncio.Task[None] | None = None

    def keep(self, task: asyncio.Future[Any]) -> None:
        """Hold a background task until it is done (shutdown waits for them)."""
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def take_over(
        self, target: ConsoleTarget, socket: VMConsoleSocket, attach: Attach
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
                raise _Gone()
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


class _Gone(Exception):
    """The socket closed before its console was attached."""


class VMConsoleSocket(ScrubbedLogMixin, WebSocketMixin, JupyterHandler, websocket.WebSocketHandler):
    """A terminado-protocol socket bound to one VM's console."""

    auth_resource = "twarga"
    target: ConsoleTarget | None = None
    identity: Identity | None = None
    session: ConsoleSession | None = None
    # Why the session ended, for the console_close event (tornado's own close_reason is
    # what the browser sent in its close frame).
    end_reason = "closed by the client"

    @property
    def services(self) -> Any:
        return self.settings["twarga_lab_services"]

    @property
    def consoles(self) -> VMConsoleManager:
        return self.settings["twarga_lab_consoles"]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Refusals before the upgrade are JSON like the rest of the API."""
        error = kwargs.get("exc_info", (None, None, None))[1]
        message = self._reason
        if isinstance(error, web.HTTPError) and error.log_message:
            message = error.log_message % error.args if error.args else error.log_message
        reason = (getattr(error, "reason", None) or self._reason).lower().replace(" ", "_")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message, "reason": reason}))

    def skip_check_origin(self) -> bool:
        # Always check the origin, token or cookie: a console is a keyboard on a machine.
        return False

    async def get(self, vm_id: str) -> None:  # type: ignore[override]
        if "token" in self.request.query_arguments:
            raise web.HTTPError(400, "send the token in the Authorization header, not the URL")
        # Anonymous callers learn nothing, not even that this is a websocket.
        if not self.current_user:
            raise web.HTTPError(401, "authentication required")
        refusal = websocket_refusal(self)
        if refusal is not None:
            raise web.HTTPError(refusal[0], refusal[1])
        if not self.current_user:
            raise web.HTTPError(401, "authentication required")
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "execute", "twarga")
        )
        if not allowed:
            raise web.HTTPError(403, "not allowed to open consoles")
        self.identity = await self.services.identify(self.current_user)
        try:
            self.target = await self.services.consoles.authorize(self.identity, int(vm_id))
        except TwargaError as e:
            raise web.HTTPError(e.status_code, e.message, reason=e.reason) from None
        await super().get(vm_id)

    async def open(self, vm_id: str) -> None:  # type: ignore[override]
        super().open(vm_id)  # keep-alive pings
        assert self.target is not None and self.identity is not None
        self.send_json(["setup", {}])
        try:
            self.session = await self.consoles.take_over(
                self.target, self, self.services.consoles.attach
            )
        except _Gone:
            return
        except TwargaError as e:
            self.end(f"the console could not be opened: {e.message}", show=True)
            return
        self._record("console_open")
        self.send_json(
            ["stdout", f"Connected to the console of VM {self.target.vm_name}.\r\n"
                       "Escape character is ^] (Ctrl + ])\r\n"]
        )  # fmt: skip
        self.session.ready()

    def send_json(self, message: list[Any]) -> asyncio.Future[None] | None:
        """Send one message; the future resolves once it is flushed (None: closed)."""
        try:
            future = self.write_message(json.dumps(message))
        except websocket.WebSocketClosedError:
            return None
        # A socket that closes before the flush fails the future: that is no news.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def end(self, reason: str, *, show: bool = False) -> None:
        """The session is over: tell the browser (terminado's way) and close."""
        self.end_reason = reason
        if show:
            self.send_json(["stdout", f"\r\n[{reason}]\r\n"])
        self.send_json(["disconnect", 1])
        self.close()

    async def on_message(self, message: str | bytes) -> None:
        session = self.session
        if session is None or session.ended:
            return
        try:
            command = json.loads(message)
            kind = command[0]
        except (ValueError, TypeError, IndexError, KeyError):
            return
        if kind == "stdin" and len(command) > 1 and isinstance(command[1], str):
            self.consoles.touch(session)
            text, escape, _ = command[1].partition(ESCAPE)
            session.write(text)
            if escape:
                await self.consoles.end(session, "left with the escape character")
        # ["set_size", rows, cols]: a serial line has no size the host could set.

    def _record(self, action: str, **details: object) -> None:
        # The event is written in a worker thread; keep the task until it is done.
        assert self.target is not None and self.identity is not None
        consoles = self.services.consoles
        self.consoles.keep(
            asyncio.ensure_future(
                asyncio.to_thread(consoles.record, self.identity, self.target, action, **details)
            )
        )

    def on_close(self) -> None:
        session = self.session
        if session is None:
            return
        if not session.ended:
            self.consoles.keep(asyncio.ensure_future(self.consoles.end(session, self.end_reason)))
        self._record("console_close", reason=self.end_reason)


default_handlers = [(r"/twarga/api/vms/(?P<vm_id>\d+)/console", VMConsoleSocket)]
