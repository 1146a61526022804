"""``/twarga/api/admin/users/{name}``: credit grants and quota changes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import NoneType
from typing import Any, ClassVar, Self

from twarga_lab.errors import ValidationFailed
from twarga_lab.schemas.base import MAX_INT, UNSET, Request, Unset, wire
from twarga_lab.services.users import MILLI

# Credits one grant may move: the ledger keeps thousandths in 64-bit integers
# (a float like 1e300 would overflow them, and -1.8e308 * 1000 is infinite).
MAX_GRANT = 1_000_000_000


@dataclass(frozen=True)
class GrantCredits(Request):
    """``POST .../credits``: add (or, negative, take) credits, with a reason."""

    required: ClassVar[tuple[str, ...]] = ("amount", "reason")

    amount: float = field(
        metadata=wire(
            "Credits to add; negative takes them (never below a zero balance).", (int, float)
        )
    )
    reason: str = field(metadata=wire("Why, for the ledger (outer blanks dropped).", str))

    @property
    def amount_milli(self) -> int:
        """The amount in thousandths of a credit, as the ledger stores it."""
        return round(self.amount * MILLI)

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape; 422 for a blank reason (``missing_reason``),
        an amount beyond ``MAX_GRANT`` either way (``out_of_range``) or one that is zero at
        the ledger's precision or not finite (``invalid_amount``)."""
        checked = cls.checked_body(body)
        reason, amount = checked["reason"], checked["amount"]
        if not reason.strip():
            raise ValidationFailed("a reason is required", field="reason", reason="missing_reason")
        if math.isfinite(amount) and abs(amount) > MAX_GRANT:
            raise ValidationFailed(
                f"amount may be at most {MAX_GRANT:,} credits either way",
                field="amount",
                reason="out_of_range",
            )
        if not math.isfinite(amount) or round(amount * MILLI) == 0:
            raise ValidationFailed(
                "amount must be a non-zero number", field="amount", reason="invalid_amount"
            )
        return cls(amount=amount, reason=reason.strip())


QUOTA_DOC = "{}; null returns it to the default, an absent field leaves it as it is."


@dataclass(frozen=True)
class SetQuota(Request):
    """``PATCH .../quota``: per-user limits."""

    max_vms: int | Unset | None = field(
        default=UNSET,
        metadata=wire(QUOTA_DOC.format("VMs (destroyed ones not counted)"), (int, NoneType)),
    )
    max_ram_mb: int | Unset | None = field(
        default=UNSET,
        metadata=wire(QUOTA_DOC.format("Total RAM of the user's VMs, in MB"), (int, NoneType)),
    )
    max_cpu: int | Unset | None = field(
        default=UNSET,
        metadata=wire(QUOTA_DOC.format("Total vCPUs of the user's VMs"), (int, NoneType)),
    )
    max_disk_gb: int | Unset | None = field(
        default=UNSET,
        metadata=wire(QUOTA_DOC.format("Total disk of the user's VMs, in GB"), (int, NoneType)),
    )

    def changes(self) -> dict[str, int | None]:
        """The limits the body named, with their new values."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not UNSET}

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape, 422 (``out_of_range``) for a negative limit."""
        checked = cls.checked_body(body)
        for key, value in checked.items():
            if value is not None and value < 0:
                raise ValidationFailed(f"{key} must be 0 or more", field=key, reason="out_of_range")
            if value is not None and value > MAX_INT:
                raise ValidationFailed(
                    f"{key} must be at most {MAX_INT}", field=key, reason="out_of_range"
                )
        return cls(**checked)


@dataclass(frozen=True)
class UpdateHost(Request):
    """``PATCH /twarga/api/hosts/{name}``: drain a hypervisor host or take it back."""

    required: ClassVar[tuple[str, ...]] = ("draining",)

    draining: bool = field(
        metadata=wire(
            "true: the host keeps its VMs and takes no new ones; false: it takes VMs again.",
            bool,
        )
    )

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape."""
        return cls(**cls.checked_body(body))
