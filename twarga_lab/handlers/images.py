"""``/twarga/api/images``: the bootable images."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler


class ImagesHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await self.services.run(self.services.vms.list_images))


default_handlers = [(r"/twarga/api/images", ImagesHandler)]
