"""``/twarga/api/vms/{id}/snapshots``: list, take, revert to and delete VM snapshots."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import CreateSnapshot, VMAction


class SnapshotListHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, vm_id: str) -> None:
        self.write_json(await self.services.snapshots.list(self.identity, int(vm_id)))

    @web.authenticated
    @authorized
    async def post(self, vm_id: str) -> None:
        request = CreateSnapshot.from_body(self.json_body())
        snapshots = self.services.snapshots
        snapshot = await snapshots.create(self.identity, int(vm_id), request.name)
        location = f"twarga/api/vms/{int(vm_id)}/snapshots/{snapshot['name']}"
        self.set_header("Location", url_path_join(self.base_url, location))
        self.write_json(snapshot, status=201)


class SnapshotHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, vm_id: str, name: str) -> None:
        request = VMAction.from_body(self.json_body())
        snapshots = self.services.snapshots
        self.write_json(await snapshots.action(self.identity, int(vm_id), name, request.action))

    @web.authenticated
    @authorized
    async def delete(self, vm_id: str, name: str) -> None:
        await self.services.snapshots.delete(self.identity, int(vm_id), name)
        self.set_status(204)
        self.finish()


default_handlers = [
    (r"/twarga/api/vms/(?P<vm_id>\d+)/snapshots", SnapshotListHandler),
    (r"/twarga/api/vms/(?P<vm_id>\d+)/snapshots/(?P<name>[^/]+)", SnapshotHandler),
]
