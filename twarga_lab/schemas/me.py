"""``PATCH /twarga/api/me``: the caller's SSH public key."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import NoneType
from typing import Any, ClassVar, Self

from twarga_lab.errors import ValidationFailed
from twarga_lab.schemas.base import Request, wire

# A 16384-bit RSA key is about 2,800 characters; nothing real comes near this.
MAX_SSH_KEY_CHARS = 8192
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
)


def validate_ssh_key(key: str | None) -> str | None:
    """One OpenSSH public key line (words joined by one space), or None to remove it;
    ValidationFailed (422, ``ssh_key_too_long`` or ``invalid_ssh_key``) otherwise."""
    if key is None or not key.strip():
        return None
    words = key.strip().split()
    if len(key) > MAX_SSH_KEY_CHARS:
        raise ValidationFailed(
            f"ssh_public_key may be at most {MAX_SSH_KEY_CHARS} characters",
            field="ssh_public_key",
            reason="ssh_key_too_long",
        )
    if len(words) < 2 or words[0] not in SSH_KEY_TYPES or "\n" in key.strip():
        raise ValidationFailed(
            "ssh_public_key must be one OpenSSH public key line such as "
            "'ssh-ed25519 AAAA... me@laptop'",
            field="ssh_public_key",
            reason="invalid_ssh_key",
        )
    return " ".join(words)


@dataclass(frozen=True)
class SetSSHKey(Request):
    """The key installed into the VMs the caller creates next; null or blank removes it."""

    required: ClassVar[tuple[str, ...]] = ("ssh_public_key",)

    ssh_public_key: str | None = field(
        default=None,
        metadata=wire(
            "One OpenSSH public key line ('ssh-ed25519 AAAA... me@laptop'); null or blank "
            "removes it.",
            (str, NoneType),
        ),
    )

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape, 422 for a key that is not one key line."""
        checked = cls.checked_body(body)
        return cls(validate_ssh_key(checked["ssh_public_key"]))
