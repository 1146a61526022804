"""Hub accounts made by Twarga's sign-up authenticator: password rules, bcrypt hashes,
admin approval, and the lockout of sources that keep failing (see ``bans``).

No tornado here: the Hub's authenticator and handlers call this service.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import bcrypt
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import Account, utcnow
from twarga_lab.errors import Conflict, NotFound, ValidationFailed
from twarga_lab.services.bans import BanPolicy, active_ban, record_failure
from twarga_lab.services.events import EventType, Severity, record_event

# Hub names become system accounts for users' servers: keep them valid Linux user names.
ACCOUNT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
HUB_SCOPE = "hub"


@cache
def common_passwords() -> frozenset[str]:
    """Passwords too common to accept (from a list shipped with Twarga)."""
    text = resources.files("twarga_lab.hub").joinpath("common_passwords.txt").read_text()
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip())


@dataclass(frozen=True)
class PasswordRules:
    min_length: int = 8

    def check(self, name: str, password: str) -> None:
        """Raise ValidationFailed (field ``password``) naming the first rule broken."""
        if len(password) < self.min_length:
            raise ValidationFailed(
                f"the password must have at least {self.min_length} characters",
                field="password",
                reason="password_too_short",
            )
        lowered = password.lower()
        if name and name.lower() in lowered:
            raise ValidationFailed(
                "the password must not contain the user name",
                field="password",
                reason="password_contains_name",
            )
        if lowered in common_passwords():
            raise ValidationFailed(
                "this password is too common; choose another",
                field="password",
                reason="password_too_common",
            )


@dataclass(frozen=True)
class LoginResult:
    """The outcome of a login attempt; ``reason`` says why it failed."""

    ok: bool
    reason: str = ""
    message: str = ""


def hash_password(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=12)).decode()


def check_password(password: str, hashed: str) -> bool:
    return bcrypt.checkpw(password.encode(), hashed.encode())


# A real hash to compare against when the account does not exist, so that unknown
# names cost as much time as wrong passwords (no user enumeration by timing).
_DUMMY_HASH = bcrypt.hashpw(b"twarga-dummy", bcrypt.gensalt(rounds=12)).decode()


class AccountService:
    """Sign-up, login checks, approval and administration of Hub accounts."""

    def __init__(
        self,
        db: Database,
        *,
        rules: PasswordRules | None = None,
        ban_policy: BanPolicy | None = None,
        approval_required: bool = True,
    ) -> None:
        self.db = db
        self.rules = rules or PasswordRules()
        self.ban_policy = ban_policy or BanPolicy()
        self.approval_required = approval_required

    # -- sign-up and login ----------------------------------------------------------

    def sign_up(self, name: str, password: str, source: str) -> dict[str, Any]:
        """Create an account (waiting for approval unless approval is off)."""
        if not ACCOUNT_NAME_RE.fullmatch(name):
            raise ValidationFailed(
                "the user name must be 1-32 characters: a lowercase letter, then lowercase "
                "letters, digits or hyphens",
                field="username",
                reason="invalid_username",
            )
        self.rules.check(name, password)
        hashed = hash_password(password)
        with self.db.session() as session:
            if session.get(Account, name) is not None:
                raise Conflict(f"the user name {name} is taken", "name_taken")
            account = Account(name=name, password_hash=hashed, approved=not self.approval_required)
            session.add(account)
            record_event(
                session, EventType.auth, Severity.info,
                f"sign-up of {name}" + (" (waiting for approval)" if not account.approved else ""),
                user_name=name, source=source, action="signup", approved=account.approved,
            )  # fmt: skip
            session.flush()
            return self._to_json(account)

    def login(self, name: str, password: str, source: str) -> LoginResult:
        """Check a login; failures count against the source, and enough of them ban it."""
        with self.db.session() as session:
            ban = active_ban(session, HUB_SCOPE, source)
            if ban is not None:
                record_event(
                    session, EventType.auth, Severity.warning,
                    f"login of {name} refused: {source} is banned until "
                    f"{ban.banned_until.isoformat(timespec='seconds')}",
                    user_name=name, source=source, action="login_refused",
                    banned_until=ban.banned_until.isoformat(),
                )  # fmt: skip
                return LoginResult(False, "banned", "too many failed logins; try again later")
            account = session.get(Account, name)
            hashed = account.password_hash if account is not None else _DUMMY_HASH
            if account is None or not check_password(password, hashed):
                outcome = record_failure(session, self.ban_policy, HUB_SCOPE, source, name)
                record_event(
                    session, EventType.auth, Severity.warning,
                    f"failed login for {name} from {source}",
                    user_name=name, source=source, action="login_failed",
                    failures_in_window=outcome.failures_in_window,
                )  # fmt: skip
                if outcome.newly_banned:
                    assert outcome.banned_until is not None
                    record_event(
                        session, EventType.security, Severity.critical,
                        f"brute force on the Hub login from {source}: "
                        f"{outcome.failures_in_window} failures within "
                        f"{self.ban_policy.findtime:g} s; banned until "
                        f"{outcome.banned_until.isoformat(timespec='seconds')}",
                        user_name=name, source=source, action="ban", scope=HUB_SCOPE,
                        ban_count=outcome.ban_count,
                        banned_until=outcome.banned_until.isoformat(),
                    )  # fmt: skip
                return LoginResult(False, "bad_credentials", "invalid user name or password")
            if account.disabled:
                record_event(
                    session, EventType.auth, Severity.warning, f"login of disabled {name}",
                    user_name=name, source=source, action="login_disabled",
                )  # fmt: skip
                return LoginResult(False, "disabled", "this account is disabled")
            if not account.approved:
                return LoginResult(False, "not_approved", "this account awaits an admin's approval")
            account.last_login = utcnow()
            record_event(
                session, EventType.auth, Severity.info, f"login of {name} from {source}",
                user_name=name, source=source, action="login",
            )  # fmt: skip
            return LoginResult(True)

    def is_banned(self, source: str) -> bool:
        """Whether ``source`` may not even try to log in now."""
        with self.db.session() as session:
            return active_ban(session, HUB_SCOPE, source) is not None

    # -- administration -----------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Every account, newest first."""
        with self.db.session() as session:
            accounts = session.scalars(select(Account).order_by(Account.created_at.desc()))
            return [self._to_json(a) for a in accounts]

    def get(self, name: str) -> dict[str, Any] | None:
        with self.db.session() as session:
            account = session.get(Account, name)
            return self._to_json(account) if account else None

    def _change(self, actor: str, name: str, action: str, **values: Any) -> dict[str, Any]:
        with self.db.session() as session:
            account = session.get(Account, name)
            if account is None:
                raise NotFound(f"no account named {name}", "no_account")
            for key, value in values.items():
                setattr(account, key, value)
            record_event(
                session, EventType.auth, Severity.info, f"{actor} {action} the account {name}",
                user_name=name, action=action, actor=actor,
            )  # fmt: skip
            session.flush()
            return self._to_json(account)

    def approve(self, actor: str, name: str) -> dict[str, Any]:
        return self._change(actor, name, "approved", approved=True, approved_by=actor)

    def disable(self, actor: str, name: str) -> dict[str, Any]:
        return self._change(actor, name, "disabled", disabled=True)

    def enable(self, actor: str, name: str) -> dict[str, Any]:
        return self._change(actor, name, "enabled", disabled=False)

    def reset_password(self, actor: str, name: str) -> str:
        """Give the account a new random password and return it (shown to the admin once)."""
        password = secrets.token_urlsafe(12)
        self._change(actor, name, "reset the password of", password_hash=hash_password(password))
        return password

    def ensure_admin(self, name: str, password: str) -> bool:
        """Create an approved account for the first admin; False if it exists already."""
        with self.db.session() as session:
            if session.get(Account, name) is not None:
                return False
            session.add(Account(name=name, password_hash=hash_password(password),
                                approved=True, approved_by="setup"))  # fmt: skip
            record_event(
                session, EventType.auth, Severity.info, f"admin account {name} created",
                user_name=name, action="create_admin", actor="setup",
            )  # fmt: skip
            return True

    @staticmethod
    def _to_json(account: Account) -> dict[str, Any]:
        return {
            "name": account.name,
            "approved": account.approved,
            "disabled": account.disabled,
            "created_at": account.created_at.isoformat() if account.created_at else None,
            "approved_by": account.approved_by,
            "last_login": account.last_login.isoformat() if account.last_login else None,
        }
