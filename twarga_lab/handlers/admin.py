"""``/twarga/api/admin``: users with credits and quotas, credit grants, quota edits."""

from __future__ import annotations

from urllib.parse import unquote

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.errors import Forbidden
from twarga_lab.handlers.base import TwargaAPIHandler
from twarga_lab.schemas import GrantCredits, SetQuota


class AdminHandler(TwargaAPIHandler):
    """Admins only: everyone else gets 403."""

    async def prepare(self) -> None:
        await super().prepare()
        if not self.identity.admin:
            raise Forbidden("only admins may do this", "admin_required")


class AdminUsersHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.write_json(await self.services.run(self.services.credits.list_users))


class AdminCreditsHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        ledger = await self.services.run(self.services.credits.ledger, unquote(name))
        self.write_json(ledger)

    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        request = GrantCredits.from_body(self.json_body())
        credits = self.services.credits
        balance = await self.services.run(credits.grant, self.identity, unquote(name), request)
        self.write_json({"name": unquote(name), "new_balance": balance})


class AdminQuotaHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def patch(self, name: str) -> None:
        request = SetQuota.from_body(self.json_body())
        credits = self.services.credits
        self.write_json(
            await self.services.run(credits.set_quota, self.identity, unquote(name), request)
        )


default_handlers = [
    (r"/twarga/api/admin/users", AdminUsersHandler),
    (r"/twarga/api/admin/users/(?P<name>[^/]+)/credits", AdminCreditsHandler),
    (r"/twarga/api/admin/users/(?P<name>[^/]+)/quota", AdminQuotaHandler),
]
