"""Twarga's own sign-up authenticator for JupyterHub.

``jupyterhub-nativeauthenticator`` 1.3.0 answers 500 on every login under JupyterHub 6, so
Twarga carries this one: a sign-up page with password rules, bcrypt hashes, optional admin
approval, an admin page to approve, disable and reset passwords (POST only), and a lockout
of failing sources that lives in Twarga's database (it survives Hub restarts and shows in
the SOC). The logic is in :mod:`twarga_lab.services.accounts`; this module is the Hub glue.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from jupyterhub.auth import LocalAuthenticator
from jupyterhub.handlers import BaseHandler
from jupyterhub.scopes import needs_scope
from tornado import web
from traitlets import Bool, Float, Int, Unicode, default

from twarga_lab.db import Database
from twarga_lab.errors import TwargaError
from twarga_lab.services.accounts import AccountService, PasswordRules
from twarga_lab.services.bans import BanPolicy

TEMPLATES = str(Path(__file__).parent / "templates")


class SignUpHandler(BaseHandler):
    """``/hub/signup``: the form, and the account it creates."""

    @property
    def accounts(self) -> AccountService:
        return self.authenticator.accounts

    async def get(self) -> None:
        html = await self.render_template("twarga-signup.html", errors={}, done=None, username="")
        self.finish(html)

    async def post(self) -> None:
        name = self.get_body_argument("username", "").strip()
        password = self.get_body_argument("password", "")
        confirm = self.get_body_argument("password_confirm", "")
        errors: dict[str, str] = {}
        done = None
        if password != confirm:
            errors["password_confirm"] = "the two passwords differ"
        else:
            try:
                account = await asyncio.to_thread(
                    self.accounts.sign_up, name, password, self.request.remote_ip or ""
                )
                done = (
                    "Your account is ready: log in."
                    if account["approved"]
                    else "Your account was created and waits for an admin's approval."
                )
            except TwargaError as e:
                errors[str(e.details.get("field") or "username")] = e.message
                self.set_status(e.status_code)
        html = await self.render_template(
            "twarga-signup.html", errors=errors, done=done, username=name
        )
        self.finish(html)


class AccountsAdminHandler(BaseHandler):
    """``/hub/twarga-accounts``: admins approve, disable, enable and reset passwords."""

    @property
    def accounts(self) -> AccountService:
        return self.authenticator.accounts

    @web.authenticated
    @needs_scope("admin:users")
    async def get(self) -> None:
        await self._render()

    @web.authenticated
    @needs_scope("admin:users")
    async def post(self) -> None:
        action = self.get_body_argument("action", "")
        name = self.get_body_argument("name", "")
        actor = self.current_user.name
        notice = ""
        try:
            if action == "approve":
                await asyncio.to_thread(self.accounts.approve, actor, name)
                notice = f"{name} is approved"
            elif action == "disable":
                await asyncio.to_thread(self.accounts.disable, actor, name)
                notice = f"{name} is disabled"
            elif action == "enable":
                await asyncio.to_thread(self.accounts.enable, actor, name)
                notice = f"{name} is enabled"
            elif action == "reset":
                password = await asyncio.to_thread(self.accounts.reset_password, actor, name)
                notice = f"new password for {name}: {password}"
            else:
                raise web.HTTPError(400, f"unknown action {action!r}")
        except TwargaError as e:
            self.set_status(e.status_code)
            notice = e.message
        await self._render(notice)

    async def _render(self, notice: str = "") -> None:
        listing = await asyncio.to_thread(self.accounts.list)
        html = await self.render_template("twarga-accounts.html", accounts=listing, notice=notice)
        self.finish(html)


class TwargaAuthenticator(LocalAuthenticator):
    """Sign-up, bcrypt passwords, admin approval and persistent lockout, in Twarga's DB."""

    db_url = Unicode(
        help="SQLAlchemy URL of Twarga's database (the same one the twarga service uses).",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        import os

        url = os.environ.get("TWARGA_DB_URL")
        if not url:
            raise ValueError("set TwargaAuthenticator.db_url or TWARGA_DB_URL")
        return url

    approval_required = Bool(
        True, help="New sign-ups cannot log in until an admin approves them."
    ).tag(config=True)
    min_password_length = Int(8, help="Shortest password accepted at sign-up.").tag(config=True)
    lockout_maxretry = Int(5, help="Failed logins from one source that trigger a ban.").tag(
        config=True
    )
    lockout_findtime = Float(600.0, help="Window (s) in which those failures count.").tag(
        config=True
    )
    lockout_bantime = Float(600.0, help="First ban (s); it doubles for repeat offenders.").tag(
        config=True
    )

    @default("create_system_users")
    def _default_create_system_users(self) -> bool:
        # Each person's server runs as their own system account, made on first login.
        return True

    _accounts: AccountService | None = None

    @property
    def accounts(self) -> AccountService:
        """The account service over Twarga's database (opened on first use)."""
        if self._accounts is None:
            self._accounts = AccountService(
                Database(self.db_url).open(),
                rules=PasswordRules(min_length=self.min_password_length),
                ban_policy=BanPolicy(
                    maxretry=self.lockout_maxretry,
                    findtime=self.lockout_findtime,
                    bantime=self.lockout_bantime,
                ),
                approval_required=self.approval_required,
            )
        return self._accounts

    async def authenticate(self, handler: web.RequestHandler, data: dict[str, Any]) -> Any:
        name = self.normalize_username(data.get("username", ""))
        source = handler.request.remote_ip or ""
        result = await asyncio.to_thread(
            self.accounts.login, name, data.get("password", ""), source
        )
        if result.ok:
            return {"name": name}
        self.log.warning("login of %s from %s refused: %s", name, source, result.reason)
        if result.reason in ("banned", "not_approved", "disabled"):
            # A message the login page shows, instead of "invalid user name or password".
            raise web.HTTPError(403, result.message)
        return None

    def get_handlers(self, app: Any) -> list[tuple[str, Any]]:
        return [
            *super().get_handlers(app),
            (r"/signup", SignUpHandler),
            (r"/twarga-accounts", AccountsAdminHandler),
        ]
