"""Proxy mode: in a Hub user's own server, ``/twarga/api/...`` is forwarded to the twarga
service with the server's Hub token, so the lab panel and notebooks use the same paths in
personal and Hub mode while only the service touches libvirt and the database."""

from __future__ import annotations

from dataclasses import dataclass

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import httpclient, web

# Headers worth passing back to the browser.
PASSED_HEADERS = ("Content-Type", "Location", "Retry-After")


@dataclass(frozen=True)
class ProxyTarget:
    """Where the twarga service listens and the token that identifies this user to it."""

    service_url: str
    token: str


class TwargaProxyHandler(APIHandler):
    """Forwards one API request to the twarga service as the server's owner."""

    @property
    def target(self) -> ProxyTarget:
        return self.settings["twarga_lab_proxy"]

    async def _forward(self, path: str) -> None:
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
    async def get(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    async def post(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    async def patch(self, path: str) -> None:
        await self._forward(path)

    @web.authenticated
    async def delete(self, path: str) -> None:
        await self._forward(path)


PROXY_ROUTES = [(r"/twarga/api/(?P<path>.*)", TwargaProxyHandler)]
