"""``/twarga/api/labs``, ``/lab-templates`` and ``/deployments``: labs made from
templates, their actions and checks, and templates handed to a Hub group."""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from jupyter_server.utils import url_path_join
from tornado import web

from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import CreateDeployment, CreateLab, LabAction, check_types


class LabTemplateListHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        labs = self.services.labs
        self.write_json(await self.services.run(labs.list_templates))


class LabListHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        all_users = self.get_argument("all", "0").lower() in ("1", "true", "yes")
        labs = self.services.labs
        self.write_json(await self.services.run(labs.list, self.identity, all_users))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        request = CreateLab.from_body(self.json_body())
        lab = await self.services.labs.create(self.identity, request)
        self.set_header("Location", url_path_join(self.base_url, "twarga/api/labs", str(lab["id"])))
        self.write_json(lab, status=201)


class LabHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, lab_id: str) -> None:
        self.write_json(await self.services.labs.get(self.identity, int(lab_id)))

    @web.authenticated
    @authorized
    async def delete(self, lab_id: str) -> None:
        await self.services.labs.destroy(self.identity, int(lab_id))
        self.set_status(204)
        self.finish()


class LabActionHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def post(self, lab_id: str) -> None:
        request = LabAction.from_body(self.json_body())
        self.write_json(await self.services.labs.action(self.identity, int(lab_id), request.action))


class LabCheckHandler(TwargaAPIHandler):
    """Run a lab's checks now (they log in to its VMs over SSH) and grade them."""

    @web.authenticated
    @authorized
    async def post(self, lab_id: str) -> None:
        check_types(self.json_body(), {})  # no options: any field is a mistake
        self.write_json(await self.services.labs.check(self.identity, int(lab_id)))


class DeploymentListHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        labs = self.services.labs
        self.write_json(await self.services.run(labs.list_deployments, self.identity))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        request = CreateDeployment.from_body(self.json_body())
        deployment = await self.services.labs.deploy(self.identity, request)
        location = url_path_join(self.base_url, "twarga/api/deployments", str(deployment["id"]))
        self.set_header("Location", location)
        self.write_json(deployment, status=201)


class DeploymentHandler(TwargaAPIHandler):
    @web.authenticated
    @authorized
    async def get(self, deployment_id: str) -> None:
        labs = self.services.labs
        self.write_json(await labs.get_deployment(self.identity, int(deployment_id)))


class DeploymentCheckHandler(TwargaAPIHandler):
    """Grade every student's lab of a deployment."""

    @web.authenticated
    @authorized
    async def post(self, deployment_id: str) -> None:
        check_types(self.json_body(), {})  # no options: any field is a mistake
        labs = self.services.labs
        self.write_json(await labs.check_deployment(self.identity, int(deployment_id)))


default_handlers = [
    (r"/twarga/api/lab-templates", LabTemplateListHandler),
    (r"/twarga/api/labs", LabListHandler),
    (r"/twarga/api/labs/(?P<lab_id>\d+)", LabHandler),
    (r"/twarga/api/labs/(?P<lab_id>\d+)/action", LabActionHandler),
    (r"/twarga/api/labs/(?P<lab_id>\d+)/check", LabCheckHandler),
    (r"/twarga/api/deployments", DeploymentListHandler),
    (r"/twarga/api/deployments/(?P<deployment_id>\d+)", DeploymentHandler),
    (r"/twarga/api/deployments/(?P<deployment_id>\d+)/check", DeploymentCheckHandler),
]
