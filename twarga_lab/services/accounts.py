"""Hub accounts made by Twarga's sign-up authenticator: password rules, bcrypt hashes,
admin approval, the names that may never become accounts, and the lockout of accounts and
sources that keep failing (see ``bans``).

The lockout has two keys. Failures against one account (from any address) lock that
account after ``account_policy.maxretry``; failures from one address (against any
account) ban the address after ``source_policy.maxretry``, which is larger so that a few
typos behind a shared address lock out only the person who made them. An attempt is
counted *before* its password is checked, in the same locked step as the ban check, so
parallel attempts cannot all slip past the check: at most ``maxretry`` passwords are
ever checked per key and window.

No tornado here: the Hub's authenticator and handlers call this service.

Why it is long: the sign-up rules, password hashing and the two-key lockout are one
transaction each (a failure is counted in the same locked step as the ban check), which is
clearer read top to bottom than spread over modules.
"""

from __future__ import annotations

import grp
import pwd
import re
import secrets
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from importlib import resources
from typing import Any

import bcrypt
from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import Account, AuthFailure, Event, utcnow
from twarga_lab.errors import Conflict, NotFound, TwargaError, ValidationFailed
from twarga_lab.services.bans import BanPolicy, active_ban, record_failure
from twarga_lab.services.events import EventType, Severity, record_event

# Hub names become system accounts for users' servers: keep them valid Linux user names.
ACCOUNT_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
HUB_SCOPE = "hub"  # failures and bans per source address
ACCOUNT_SCOPE = "hub-account"  # failures and locks per account name
BCRYPT_MAX_BYTES = 72

# Names that never become Hub accounts, whether or not a system account exists today:
# the superuser and administrative groups, daemons' accounts that packages create later,
# and Twarga's and JupyterHub's own names.
_RESERVED = """
    root admin administrator admins adm sudo sudoers wheel staff operator sys system
    sysadmin superuser su daemon bin nobody nogroup www-data mail news uucp proxy backup
    list irc gnats games man lp sync shutdown halt messagebus polkitd dbus avahi colord
    postgres postgresql mysql mariadb redis mongodb sshd ssh ftp nginx apache httpd
    libvirt libvirt-qemu libvirt-dnsmasq libvirtd qemu kvm docker lxd podman containerd
    jupyter jupyterhub hub twarga services service api user users tss uuidd dnsmasq
    systemd-network systemd-resolve systemd-timesync systemd-coredump chrony ntp
"""
RESERVED_NAMES = frozenset(_RESERVED.split())
RESERVED_PREFIXES = ("admin", "root", "twarga", "jupyter", "libvirt", "systemd-", "qemu")


class TooManyRequests(TwargaError):
    """Too many attempts from one source; try again later."""

    status_code = 429
    default_reason = "too_many_requests"


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
        if len(password.encode()) > BCRYPT_MAX_BYTES:
            # bcrypt reads 72 bytes at most (bcrypt 5 refuses more): say so, never truncate.
            raise ValidationFailed(
                f"the password must be at most {BCRYPT_MAX_BYTES} bytes long (UTF-8); "
                "choose a shorter one",
                field="password",
                reason="password_too_long",
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
    data = password.encode()
    if len(data) > BCRYPT_MAX_BYTES:
        raise ValidationFailed(
            f"the password must be at most {BCRYPT_MAX_BYTES} bytes long (UTF-8)",
            field="password",
            reason="password_too_long",
        )
    return bcrypt.hashpw(data, bcrypt.gensalt(rounds=12)).decode()


def check_password(password: str, hashed: str) -> bool:
    # bcrypt 4 silently used the first 72 bytes of longer passwords; hashes made then still
    # match the same way. bcrypt 5 raises on more, which must be a refusal, never a 500.
    return bcrypt.checkpw(password.encode()[:BCRYPT_MAX_BYTES], hashed.encode())


# A real hash to compare against when the account does not exist, so that unknown
# names cost as much time as wrong passwords (no user enumeration by timing).
_DUMMY_HASH = bcrypt.hashpw(b"twarga-dummy", bcrypt.gensalt(rounds=12)).decode()


def system_account_exists(name: str) -> bool:
    """Whether the host has a user or a group called ``name``."""
    for lookup in (pwd.getpwnam, grp.getgrnam):
        try:
            lookup(name)
        except KeyError:
            continue
        return True
    return False


def is_reserved(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether ``name`` may never be signed up for (see :data:`RESERVED_NAMES`)."""
    return name in RESERVED_NAMES or name in set(extra) or name.startswith(RESERVED_PREFIXES)


def account_refusal(db: Database, name: str) -> str | None:
    """Why the Hub user ``name`` may not use Twarga now (disabled, not approved), or None
    (also when the name has no account here: the Hub made that user some other way)."""
    with db.session() as session:
        account = session.get(Account, name)
        if account is None:
            return None
        if account.disabled:
            return "this account is disabled"
        if not account.approved:
            return "this account awaits an admin's approval"
        return None


class AccountService:
    """Sign-up, login checks, approval and administration of Hub accounts."""

    def __init__(
        self,
        db: Database,
        *,
        rules: PasswordRules | None = None,
        ban_policy: BanPolicy | None = None,
        source_policy: BanPolicy | None = None,
        approval_required: bool = True,
        reserved_names: Iterable[str] = (),
        signup_limit: int = 20,
        signup_window: float = 3600.0,
        system_account_exists: Callable[[str], bool] = system_account_exists,
    ) -> None:
        self.db = db
        self.rules = rules or PasswordRules()
        # ``ban_policy`` locks an account; ``source_policy`` bans an address.
        self.ban_policy = ban_policy or BanPolicy()
        self.source_policy = source_policy or BanPolicy(
            maxretry=self.ban_policy.maxretry * 4,
            findtime=self.ban_policy.findtime,
            bantime=self.ban_policy.bantime,
        )
        self.approval_required = approval_required
        self.reserved_names = frozenset(reserved_names)
        self.signup_limit = signup_limit
        self.signup_window = signup_window
        self.system_account_exists = system_account_exists
        # The Hub is one process: this lock and (on PostgreSQL) an advisory lock make
        # the ban check and the counting of an attempt one step.
        self._lock = threading.Lock()
        self._signup_lock = threading.Lock()

    # -- sign-up and login ----------------------------------------------------------

    def check_name(self, name: str) -> None:
        """Raise ValidationFailed (field ``username``) if ``name`` cannot be signed up for."""
        if not ACCOUNT_NAME_RE.fullmatch(name):
            raise ValidationFailed(
                "the user name must be 1-32 characters: a lowercase letter, then lowercase "
                "letters, digits or hyphens",
                field="username",
                reason="invalid_username",
            )
        if self.system_account_exists(name):
            raise ValidationFailed(
                f"the user name {name} belongs to an account of this computer's system; "
                "choose another",
                field="username",
                reason="system_username",
            )
        if is_reserved(name, self.reserved_names):
            raise ValidationFailed(
                f"the user name {name} is reserved; choose another",
                field="username",
                reason="reserved_username",
            )

    def sign_up(self, name: str, password: str, source: str) -> dict[str, Any]:
        """Create an account (waiting for approval unless approval is off).

        Every cheap check (the name, the password rules, a name taken, too many sign-ups
        from ``source``) comes before the costly bcrypt hash.
        """
        self.check_name(name)
        self.rules.check(name, password)
        # One sign-up at a time: the limit cannot be overrun by parallel requests, two
        # sign-ups of one name cannot race, and a flood costs one bcrypt at a time.
        with self._signup_lock:
            with self.db.session() as session:
                if session.get(Account, name) is not None:
                    raise Conflict(f"the user name {name} is taken", "name_taken")
                over_limit = self._signup_limit_reached(session, source)
            if over_limit:
                raise TooManyRequests(
                    "too many sign-ups from your address; try again later", "signup_rate_limited"
                )
            hashed = hash_password(password)
            with self.db.session() as session:
                account = Account(
                    name=name, password_hash=hashed, approved=not self.approval_required
                )
                session.add(account)
                record_event(
                    session, EventType.auth, Severity.info,
                    f"sign-up of {name}" + ("" if account.approved else " (waiting for approval)"),
                    user_name=name, source=source, action="signup", approved=account.approved,
                )  # fmt: skip
                session.flush()
                return self._to_json(account)

    def _signup_limit_reached(self, session: Session, source: str) -> bool:
        """Whether ``source`` made ``signup_limit`` sign-ups within the window (then the
        refusal is recorded as a security event)."""
        since = utcnow() - timedelta(seconds=self.signup_window)
        recent = session.scalar(
            select(func.count(Event.id)).where(
                Event.source == source,
                Event.type == EventType.auth.value,
                Event.created_at > since,
                Event.message.like("sign-up of %"),
            )
        )
        if int(recent or 0) < self.signup_limit:
            return False
        record_event(
            session, EventType.security, Severity.warning,
            f"sign-up from {source} refused: {recent} sign-ups within {self.signup_window:g} s",
            source=source, action="signup_refused",
        )  # fmt: skip
        return True

    def login(self, name: str, password: str, source: str) -> LoginResult:
        """Check a login. The attempt is counted against the account and the source
        before the password is checked; a right password takes the count back."""
        reserved = self._reserve_attempt(name, source, "login")
        if isinstance(reserved, LoginResult):
            return reserved
        with self.db.session() as session:
            account = session.get(Account, name)
            hashed = account.password_hash if account is not None else _DUMMY_HASH
        if not check_password(password, hashed) or account is None:
            self._count_failure(name, source, reserved, "login")
            return LoginResult(False, "bad_credentials", "invalid user name or password")
        self._release_attempt(reserved)
        with self.db.session() as session:
            account = session.get(Account, name)
            if account is None:  # deleted meanwhile
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

    def change_password(self, name: str, current: str, new: str, source: str) -> None:
        """A user changes their own password; a wrong ``current`` counts as a failed
        login (so this form is no way around the lockout)."""
        self.rules.check(name, new)
        reserved = self._reserve_attempt(name, source, "password change")
        if isinstance(reserved, LoginResult):
            raise TooManyRequests(reserved.message, "locked_out")
        with self.db.session() as session:
            account = session.get(Account, name)
            hashed = account.password_hash if account is not None else _DUMMY_HASH
        if not check_password(current, hashed) or account is None:
            self._count_failure(name, source, reserved, "password change")
            raise ValidationFailed(
                "the current password is wrong", field="current_password", reason="bad_password"
            )
        self._release_attempt(reserved)
        hashed = hash_password(new)
        with self.db.session() as session:
            account = session.get(Account, name)
            if account is None:
                raise NotFound(f"no account named {name}", "no_account")
            account.password_hash = hashed
            record_event(
                session, EventType.auth, Severity.info, f"{name} changed their password",
                user_name=name, source=source, action="password_changed", actor=name,
            )  # fmt: skip

    # -- the atomic check-and-count of attempts ------------------------------------------

    def _serialize(self, session: Session, key: str) -> None:
        """Across processes on PostgreSQL: one transaction at a time per key."""
        if self.db.engine.dialect.name == "postgresql":
            session.execute(
                text("SELECT pg_advisory_xact_lock(:k)"), {"k": zlib.crc32(key.encode())}
            )

    def _reserve_attempt(self, name: str, source: str, what: str) -> list[int] | LoginResult:
        """Refuse if the account or the source is banned or has no attempts left in the
        window; otherwise count this attempt as a failure now and return the rows."""
        keys = ((ACCOUNT_SCOPE, name, self.ban_policy), (HUB_SCOPE, source, self.source_policy))
        with self._lock, self.db.session() as session:
            self._serialize(session, f"hub-login:{name}")
            now = utcnow()
            for scope, key, policy in keys:
                ban = active_ban(session, scope, key, now)
                since = now - timedelta(seconds=policy.findtime)
                in_window = session.scalar(
                    select(func.count(AuthFailure.id)).where(
                        AuthFailure.scope == scope,
                        AuthFailure.source == key,
                        AuthFailure.ts > since,
                    )
                )
                if ban is None and int(in_window or 0) < policy.maxretry:
                    continue
                until = ban.banned_until.isoformat(timespec="seconds") if ban else "later"
                whom = f"the account {name}" if scope == ACCOUNT_SCOPE else source
                record_event(
                    session, EventType.auth, Severity.warning,
                    f"{what} of {name} from {source} refused: {whom} is locked until {until}",
                    user_name=name, source=source, action="login_refused", scope=scope,
                    banned_until=ban.banned_until.isoformat() if ban else None,
                )  # fmt: skip
                return LoginResult(False, "banned", "too many failed logins; try again later")
            rows = [
                AuthFailure(scope=ACCOUNT_SCOPE, source=name, user_name=name, ts=now),
                AuthFailure(scope=HUB_SCOPE, source=source, user_name=name, ts=now),
            ]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def _release_attempt(self, rows: list[int]) -> None:
        with self._lock, self.db.session() as session:
            session.execute(delete(AuthFailure).where(AuthFailure.id.in_(rows)))

    def _count_failure(self, name: str, source: str, rows: list[int], what: str) -> None:
        """Turn the reserved attempt into a failure; lock or ban at ``maxretry``."""
        with self._lock, self.db.session() as session:
            self._serialize(session, f"hub-login:{name}")
            session.execute(delete(AuthFailure).where(AuthFailure.id.in_(rows)))
            by_account = record_failure(session, self.ban_policy, ACCOUNT_SCOPE, name, name)
            by_source = record_failure(session, self.source_policy, HUB_SCOPE, source, name)
            record_event(
                session, EventType.auth, Severity.warning,
                f"failed {what} for {name} from {source}",
                user_name=name, source=source, action="login_failed",
                failures_in_window=by_account.failures_in_window,
                source_failures_in_window=by_source.failures_in_window,
            )  # fmt: skip
            for result, policy, scope, what, verb in (
                (by_account, self.ban_policy, ACCOUNT_SCOPE,
                 f"the Hub account {name} (last from {source})", "locked"),
                (by_source, self.source_policy, HUB_SCOPE, f"the Hub login from {source}",
                 "banned"),
            ):  # fmt: skip
                if not result.newly_banned:
                    continue
                assert result.banned_until is not None
                record_event(
                    session, EventType.security, Severity.critical,
                    f"brute force on {what}: {result.failures_in_window} failures within "
                    f"{policy.findtime:g} s; {verb} until "
                    f"{result.banned_until.isoformat(timespec='seconds')}",
                    user_name=name, source=source, action="ban", scope=scope,
                    ban_count=result.ban_count, banned_until=result.banned_until.isoformat(),
                )  # fmt: skip

    def is_banned(self, source: str) -> bool:
        """Whether ``source`` may not even try to log in now."""
        with self.db.session() as session:
            return active_ban(session, HUB_SCOPE, source) is not None

    def is_locked(self, name: str) -> bool:
        """Whether the account ``name`` is locked by failed logins now."""
        with self.db.session() as session:
            return active_ban(session, ACCOUNT_SCOPE, name) is not None

    # -- system accounts ---------------------------------------------------------------

    def system_uid(self, name: str) -> int | None:
        """The uid of the system account Twarga created for ``name``, if any."""
        with self.db.session() as session:
            account = session.get(Account, name)
            return account.system_uid if account is not None else None

    def record_system_uid(self, name: str, uid: int) -> None:
        with self.db.session() as session:
            account = session.get(Account, name)
            if account is None:
                raise NotFound(f"no account named {name}", "no_account")
            account.system_uid = uid
            record_event(
                session, EventType.auth, Severity.info,
                f"system account {name} (uid {uid}) created for the Hub user {name}",
                user_name=name, action="system_account_created", uid=uid,
            )  # fmt: skip

    def refusal(self, name: str) -> str | None:
        """Why ``name`` may not use Twarga now (disabled, not approved), or None."""
        return account_refusal(self.db, name)

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
