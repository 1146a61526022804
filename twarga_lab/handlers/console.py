"""``/twarga/api/vms/{id}/console``: a terminado websocket on the VM's serial console.

The caller is authenticated and authorized (owner or admin, VM running) and the origin is
checked before the socket is upgraded; tokens are accepted in headers and cookies only.
One session per VM: a new one takes over. Sessions close after ``console_idle_timeout``
seconds without input and when the VM stops (``virsh console`` ends with the domain).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from terminado.management import NamedTermManager, PtyWithClients, TermManagerBase
from terminado.websocket import TermSocket
from tornado import web

from twarga_lab.errors import TwargaError
from twarga_lab.services import Identity
from twarga_lab.services.consoles import ConsoleTarget


class VMConsoleManager(NamedTermManager):
    """Named terminals, one per VM, each running the VM's own console command."""

    def __init__(self, idle_timeout: float, **kwargs: Any) -> None:
        super().__init__(shell_command=["false"], **kwargs)
        self.idle_timeout = idle_timeout
        self.last_input: dict[str, float] = {}
        self.background: set[asyncio.Future[Any]] = set()
        self._culler: asyncio.Task[None] | None = None

    def take_over(self, target: ConsoleTarget) -> None:
        """Start a fresh session for the VM, disconnecting anyone on the old one."""
        name = target.session_name
        old = self.terminals.pop(name, None)
        if old is not None:
            clients, old.clients = list(old.clients), []
            for client in clients:
                client.on_pty_died()  # tells the browser, closes its socket
            old.kill()
        term = self.new_terminal(shell_command=list(target.argv))
        term.term_name = name
        self.terminals[name] = term
        self.last_input[name] = time.monotonic()
        self.start_reading(term)

    def touch(self, name: str) -> None:
        """The user typed something: the session is not idle."""
        self.last_input[name] = time.monotonic()

    def on_eof(self, ptywclients: PtyWithClients) -> None:
        name = getattr(ptywclients, "term_name", None)
        if name is not None and self.terminals.get(name) is ptywclients:
            super().on_eof(ptywclients)
            return
        # An old session that was taken over: its clients were told already, and its
        # name now belongs to the new session, which must stay registered.
        ptywclients.clients = []
        TermManagerBase.on_eof(self, ptywclients)

    async def cull_idle(self) -> list[str]:
        """Close every session idle for longer than the timeout; returns their names."""
        now = time.monotonic()
        idle = [
            name
            for name in list(self.terminals)
            if now - self.last_input.get(name, now) > self.idle_timeout
        ]
        for name in idle:
            for client in list(self.terminals[name].clients):
                client.close_reason = "idle"
            await self.terminate(name, force=True)
        return idle

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
                self.log.exception("console culling failed")

    async def shutdown(self) -> None:
        if self._culler is not None:
            self._culler.cancel()
            self._culler = None
        await super().shutdown()


class VMConsoleSocket(WebSocketMixin, JupyterHandler, TermSocket):
    """A terminado socket bound to one VM's console."""

    auth_resource = "twarga"
    target: ConsoleTarget | None = None
    identity: Identity | None = None
    close_reason = "closed by the client"

    def initialize(self, **kwargs: Any) -> None:  # type: ignore[override]
        TermSocket.initialize(self, self.settings["twarga_lab_consoles"])

    @property
    def services(self) -> Any:
        return self.settings["twarga_lab_services"]

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

    def origin_check(self, origin: Any = None) -> bool:
        # jupyter_server's check_origin already ran during the upgrade.
        return True

    async def get(self, vm_id: str) -> None:  # type: ignore[override]
        if "token" in self.request.query_arguments:
            raise web.HTTPError(400, "send the token in the Authorization header, not the URL")
        if not self.current_user:
            raise web.HTTPError(401, "authentication required")
        if not self.authorizer.is_authorized(self, self.current_user, "execute", "twarga"):
            raise web.HTTPError(403)
        self.identity = await self.services.identify(self.current_user)
        try:
            self.target = await self.services.consoles.authorize(self.identity, int(vm_id))
        except TwargaError as e:
            raise web.HTTPError(e.status_code, e.message, reason=e.reason) from None
        self.term_manager.take_over(self.target)
        await super().get(vm_id)

    def _record(self, action: str, **details: object) -> None:
        # The event is written in a worker thread; keep the task until it is done.
        assert self.target is not None and self.identity is not None
        consoles = self.services.consoles
        task = asyncio.ensure_future(
            asyncio.to_thread(consoles.record, self.identity, self.target, action, **details)
        )
        self.term_manager.background.add(task)
        task.add_done_callback(self.term_manager.background.discard)

    def open(self, vm_id: str) -> None:  # type: ignore[override]
        assert self.target is not None
        super().open(self.target.session_name)
        self._record("console_open")

    async def on_message(self, message: Any) -> None:  # type: ignore[override]
        if self.target is not None:
            self.term_manager.touch(self.target.session_name)
        await TermSocket.on_message(self, message)

    def on_close(self) -> None:
        super().on_close()
        if self.target is not None and self.identity is not None:
            self._record("console_close", reason=self.close_reason)


default_handlers = [(r"/twarga/api/vms/(?P<vm_id>\d+)/console", VMConsoleSocket)]
