"""``/twarga/api/vms``: list, create, read, change, clone, destroy and act on VMs."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import CloneVM, CreateVM, UpdateVM, VMAction


class VMListHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        all_users = self.get_argument("all", "0").lower() in ("1", "true", "yes")
        self.write_json(await self.services.vms.list(self.identity, all_users=all_users))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        request = CreateVM.from_body(self.json_body())
        vm = await self.services.vms.create(self.identity, request)
        self.set_header("Location", url_path_join(self.base_url, "twarga/api/vms", str(vm["id"])))
        self.write_json(vm, status=201)


class VMHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, vm_id: str) -> None:
        self.write_json(await self.services.vms.get(self.identity, int(vm_id)))

    @web.authenticated
    @authorized
    async def patch(self, vm_id: str) -> None:
        request = UpdateVM.from_body(self.json_body())
        self.write_json(await self.services.vms.update(self.identity, int(vm_id), request))

    @web.authenticated
    @authorized
    async def delete(self, vm_id: str) -> None:
        await self.services.vms.destroy(self.identity, int(vm_id))
        self.set_status(204)
        self.finish()


class VMActionHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, vm_id: str) -> None:
        request = VMAction.from_body(self.json_body())
        vms = self.services.vms
        self.write_json(await vms.action(self.identity, int(vm_id), request.action))


class VMCloneHandler(TwargaAPIHandler):
    """A copy of a stopped VM: answered like a create (201, the new VM pending)."""

    @web.authenticated
    @authorized
    async def post(self, vm_id: str) -> None:
        request = CloneVM.from_body(self.json_body())
        vm = await self.services.vms.clone(self.identity, int(vm_id), request)
        self.set_header("Location", url_path_join(self.base_url, "twarga/api/vms", str(vm["id"])))
        self.write_json(vm, status=201)


class VMCredentialsHandler(TwargaAPIHandler):
    """Root's password and the SSH forward of a VM: its owner only (others get 404)."""

    @web.authenticated
    @authorized
    async def get(self, vm_id: str) -> None:
        vms = self.services.vms
        self.write_json(await self.services.run(vms.credentials, self.identity, int(vm_id)))


default_handlers = [
    (r"/twarga/api/vms", VMListHandler),
    (r"/twarga/api/vms/(?P<vm_id>\d+)", VMHandler),
    (r"/twarga/api/vms/(?P<vm_id>\d+)/action", VMActionHandler),
    (r"/twarga/api/vms/(?P<vm_id>\d+)/clone", VMCloneHandler),
    (r"/twarga/api/vms/(?P<vm_id>\d+)/credentials", VMCredentialsHandler),
]
