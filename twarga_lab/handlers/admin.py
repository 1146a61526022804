"""``/twarga/api/admin``: users with credits and quotas, credit grants, quota edits."""

from __future__ import annotations

from urllib.parse import unquote

from jupyter_server.auth.decorator import authorized
from tornado import web

from twarga_lab.errors import Forbidden
from twarga_lab.handlers.base import TwargaAPIHandler

QUOTA_TYPES: dict[str, type | tuple[type, ...]] = {
    "max_vms": (int, type(None)),
    "max_ram_mb": (int, type(None)),
    "max_cpu": (int, type(None)),
    "max_disk_gb": (int, type(None)),
}


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
        body = self.read_json(
            {"amount": (int, float), "reason": str}, required=("amount", "reason")
        )
        credits = self.services.credits
        balance = await self.services.run(
            credits.grant, self.identity, unquote(name), body["amount"], body["reason"]
        )
        self.write_json({"name": unquote(name), "new_balance": balance})


class AdminQuotaHandler(AdminHandler):
    @web.authenticated
    @authorized
    async def patch(self, name: str) -> None:
        body = self.read_json(QUOTA_TYPES)
        credits = self.services.credits
        self.write_json(
            await self.services.run(credits.set_quota, self.identity, unquote(name), body)
        )


default_handlers = [
    (r"/twarga/api/admin/users", AdminUsersHandler),
    (r"/twarga/api/admin/users/(?P<name>[^/]+)/credits", AdminCreditsHandler),
    (r"/twarga/api/admin/users/(?P<name>[^/]+)/quota", AdminQuotaHandler),
]
