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
import json
from typing import TYPE_CHECKING, Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import ensure_async
from tornado import web, websocket

from twarga_lab.errors import TwargaError
from twarga_lab.handlers.base import ScrubbedLogMixin
from twarga_lab.schemas import MAX_INT
from twarga_lab.services import Identity
from twarga_lab.services.consoles import (
    ConsoleGone,
    ConsoleSession,
    ConsoleTarget,
    VMConsoleManager,
)

if TYPE_CHECKING:
    from twarga_lab.app import Services

ESCAPE = "\x1d"  # ^], as in virsh console: leaves the session


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
    def services(self) -> Services:
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
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "execute", "twarga")
        )
        if not allowed:
            raise web.HTTPError(403, "not allowed to open consoles")
        if int(vm_id) > MAX_INT:  # past the database's integers: no such VM
            raise web.HTTPError(404, f"VM {vm_id} does not exist", reason="not_found")
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
        except ConsoleGone:
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
            if self.services.idle is not None and self.target is not None:
                self.services.idle.note_activity(self.target.vm_id)  # not idle: no idle stop
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
