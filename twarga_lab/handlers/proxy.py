"""Proxy mode: in a Hub user's own server, ``/twarga/api/...`` is forwarded to the twarga
service with the server's Hub token, so the lab panel and notebooks use the same paths in
personal and Hub mode while only the service touches libvirt and the database.

The server's token speaks for the server's owner, so only the owner's own requests are
forwarded: anyone else the Hub lets reach this server (an admin visiting it, a holder of
``access:servers``, a service) gets 403 JSON and nothing is sent upstream. The console
websocket is checked completely (token not in the URL, authenticated, the owner, the
authorizer, a websocket upgrade from an allowed Origin) before the upstream console is
connected, and the upstream is closed whenever the browser's side ends or is refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import ensure_async, url_path_join
from tornado import httpclient, web, websocket

from twarga_lab.handlers.base import ScrubbedLogMixin
from twarga_lab.handlers.console import websocket_refusal

# Headers worth passing back to the browser.
PASSED_HEADERS = ("Content-Type", "Location", "Retry-After")


@dataclass(frozen=True)
class ProxyTarget:
    """Where the twarga service listens, the token that identifies this server's owner
    to it, and that owner's Hub name (``$JUPYTERHUB_USER``)."""

    service_url: str
    token: str
    owner: str = ""


def acting_user(user: Any) -> str | None:
    """The Hub user a request comes from; None for services and unknown identities."""
    hub_user = getattr(user, "hub_user", None)
    if not isinstance(hub_user, dict):
        return None
    if hub_user.get("kind", "user") != "user" or not hub_user.get("name"):
        return None
    return str(hub_user["name"])


def check_owner(handler: JupyterHandler, target: ProxyTarget) -> None:
    """401 without a user, 403 unless the request is the server owner's own."""
    if not handler.current_user:
        raise web.HTTPError(401, "authentication required")
    name = acting_user(handler.current_user)
    if not target.owner or name != target.owner:
        raise web.HTTPError(
            403,
            "this server forwards Twarga requests of its owner only; "
            "use your own server or the twarga service",
        )


class TwargaProxyHandler(ScrubbedLogMixin, APIHandler):
    """Forwards one API request to the twarga service as the server's owner."""

    auth_resource = "twarga"

    @property
    def target(self) -> ProxyTarget:
        return self.settings["twarga_lab_proxy"]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        message = self._reason
        if isinstance(error, web.HTTPError) and error.log_message:
            message = error.log_message % error.args if error.args else error.log_message
        self.set_header("Content-Type", "application/json")
        self.finish(
            json.dumps({"message": message, "reason": self._reason.lower().replace(" ", "_")})
        )

    async def _forward(self, path: str) -> None:
        check_owner(self, self.target)
        url = url_path_join(self.target.service_url, "twarga/api", path)
        if self.request.query:
            url = f"{url}?{self.request.query}"
        body = self.request.body if self.request.method in ("POST", "PATCH", "PUT") else None
        request = httpclient.HTTPRequest(
            url,
            method=self.request.method,
            headers={
                "Authorization": f"token {self.target.token}",
                "Content-Type": self.request.headers.get("Content-Type", "application/json"),
            },
            body=body,
            allow_nonstandard_methods=True,
            request_timeout=120,
        )
        try:
            response = await httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError as e:
            raise web.HTTPError(503, f"the twarga service is unreachable: {e}") from e
        if response.code == 599:
            raise web.HTTPError(503, f"the twarga service is unreachable: {response.error}")
        self.set_status(response.code)
        for name in PASSED_HEADERS:
            value = response.headers.get(name)
            if value is not None:
                if name == "Location":
                    # The service's path prefix means nothing to the browser here.
                    value = url_path_join(
                        self.base_url, "twarga/api", value.split("/twarga/api/", 1)[-1]
                    )
                self.set_header(name, value)
        self.finish(response.body or b"")

    @web.authenticated
    @authorized
    async def get(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    @authorized
    async def post(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    @authorized
    async def patch(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    @authorized
    async def delete(self, path: str) -> None:
        await self._forward(path)


class TwargaConsoleProxy(
    ScrubbedLogMixin, WebSocketMixin, JupyterHandler, websocket.WebSocketHandler
):
    """Forwards a VM console websocket to the service, frame by frame.

    The service's answer (404 for someone else's VM, 409 for a stopped one) is known
    before the browser's socket is upgraded, so refusals stay plain HTTP errors.
    """

    auth_resource = "twarga"
    upstream: websocket.WebSocketClientConnection | None = None

    @property
    def target(self) -> ProxyTarget:
        return self.settings["twarga_lab_proxy"]

    def skip_check_origin(self) -> bool:
        return False  # a console is a keyboard: always check where the page came from

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(error, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message, "reason": self._reason.lower()}))

    async def get(self, vm_id: str) -> None:  # type: ignore[override]
        if "token" in self.request.query_arguments:
            raise web.HTTPError(400, "send the token in the Authorization header, not the URL")
        check_owner(self, self.target)
        allowed = await ensure_async(
            self.authorizer.is_authorized(self, self.current_user, "execute", "twarga")
        )
        if not allowed:
            raise web.HTTPError(403, "not allowed to open consoles")
        refusal = websocket_refusal(self)
        if refusal is not None:
            raise web.HTTPError(refusal[0], refusal[1])
        url = url_path_join(self.target.service_url, "twarga/api/vms", vm_id, "console")
        request = httpclient.HTTPRequest(
            url.replace("http", "ws", 1), headers={"Authorization": f"token {self.target.token}"}
        )
        try:
            self.upstream = await websocket.websocket_connect(request)
        except httpclient.HTTPClientError as e:
            body = e.response.body if e.response is not None and e.response.body else b"{}"
            try:
                message = json.loads(body).get("message", e.message)
            except ValueError:
                message = e.message
            raise web.HTTPError(e.code, message) from None
        except OSError as e:
            raise web.HTTPError(503, f"the twarga service is unreachable: {e}") from None
        try:
            await super().get(vm_id)
        finally:
            # Returns once the browser's socket is over, or was refused after all.
            self._close_upstream()

    def _close_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()

    def open(self, vm_id: str) -> None:  # type: ignore[override]
        self._pump = asyncio.ensure_future(self._relay_from_upstream())

    async def _relay_from_upstream(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        while True:
            message = await upstream.read_message()
            if message is None:
                self.close()
                return
            try:
                await self.write_message(message)
            except websocket.WebSocketClosedError:
                return

    async def on_message(self, message: str | bytes) -> None:
        if self.upstream is not None:
            with contextlib.suppress(websocket.WebSocketClosedError):
                await self.upstream.write_message(message)

    def on_close(self) -> None:
        self._close_upstream()


PROXY_ROUTES = [
    (r"/twarga/api/vms/(?P<vm_id>\d+)/console", TwargaConsoleProxy),
    (r"/twarga/api/(?P<path>.*)", TwargaProxyHandler),
]
