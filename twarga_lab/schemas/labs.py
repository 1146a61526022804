"""Requests of ``/twarga/api/labs`` and ``/twarga/api/deployments``: a lab made from a
template, a lab's actions, and a template handed to a Hub group."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from twarga_lab.errors import ValidationFailed
from twarga_lab.schemas.base import Request, wire

#: A lab's name: its VMs are called ``<lab>-<machine>``, which must still be a VM name.
LAB_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
LAB_NAME_DOC = "lowercase letters, digits and '-', starting with a letter, at most 31"
LAB_ACTIONS = ("start", "stop", "destroy")


def validate_lab_name(name: str, field_name: str = "name") -> str:
    """``name`` if it is a lab name, else 422 ``invalid_name``."""
    if not LAB_NAME_RE.fullmatch(name):
        raise ValidationFailed(
            f"a lab name has {LAB_NAME_DOC} characters, not {name!r}", field_name, "invalid_name"
        )
    return name


@dataclass(frozen=True)
class CreateLab(Request):
    """``POST /twarga/api/labs``: every machine and network of a template, all or nothing."""

    required: ClassVar[tuple[str, ...]] = ("template", "name")

    template: str | dict[str, Any] = field(
        metadata=wire(
            "A template's name (GET /twarga/api/lab-templates) or a whole template object.",
            (str, dict),
        )
    )
    name: str = field(metadata=wire(f"The lab's name: {LAB_NAME_DOC} characters.", str))
    spread: bool = field(
        default=False,
        metadata=wire(
            "Anti-affinity: each machine on a different hypervisor host. Only for a template "
            "without private networks (a lab's networks live on one host): 422 "
            "lab_on_one_host otherwise.",
            bool,
        ),
    )

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape; 422 ``invalid_name`` for a bad name."""
        checked = cls.checked_body(body)
        validate_lab_name(checked["name"])
        return cls(**checked)


@dataclass(frozen=True)
class LabAction(Request):
    """``POST /twarga/api/labs/{id}/action``."""

    required: ClassVar[tuple[str, ...]] = ("action",)

    action: str = field(metadata=wire("start, stop or destroy: every VM of the lab.", str))

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a wrong shape, 422 ``unknown_action``."""
        checked = cls.checked_body(body)
        if checked["action"] not in LAB_ACTIONS:
            raise ValidationFailed(
                f"action must be one of {', '.join(LAB_ACTIONS)}", "action", "unknown_action"
            )
        return cls(**checked)


@dataclass(frozen=True)
class CreateDeployment(Request):
    """``POST /twarga/api/deployments``: a lab from ``template`` for every member of
    ``group`` (admins, or the group's instructors)."""

    required: ClassVar[tuple[str, ...]] = ("template", "group", "name")

    template: str | dict[str, Any] = field(
        metadata=wire("A template's name or a whole template object.", (str, dict))
    )
    group: str = field(metadata=wire("The JupyterHub group whose members get a lab.", str))
    name: str = field(
        metadata=wire(f"The name of each student's lab: {LAB_NAME_DOC} characters.", str)
    )

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a wrong shape, 422 for a bad lab name or group name."""
        checked = cls.checked_body(body)
        validate_lab_name(checked["name"])
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,254}", checked["group"]):
            raise ValidationFailed("not a Hub group name", "group", "invalid_group")
        return cls(**checked)
