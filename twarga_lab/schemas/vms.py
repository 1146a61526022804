"""``/twarga/api/vms``: creating a VM, cloning one, changing one, and the bodies of VM actions and
snapshots.

The rules that need no server state live here: a VM's name, the image named twice (as
``image`` and as the seed's ``os_type``). Sizes are checked against the settings' bounds,
and the image against the image store, by the VM service (``services.vms.quota``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from twarga_lab.errors import ValidationFailed
from twarga_lab.schemas.base import UNSET, Request, Unset, wire

VM_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
NAME_DOC = "1-63 characters: a lowercase letter, then lowercase letters, digits or hyphens."


def validate_name(name: str) -> str:
    """A VM name as DESIGN.md allows it, or ValidationFailed."""
    if not VM_NAME_RE.fullmatch(name):
        raise ValidationFailed(
            "name must be 1-63 characters: a lowercase letter, then lowercase letters, "
            "digits or hyphens",
            field="name",
            reason="invalid_name",
        )
    return name


def requested_image(body: dict[str, Any]) -> str | None:
    """The image a create body names: ``image``, or the seed's ``os_type`` (its alias).

    Both given and different is a contradiction the caller must resolve (422)."""
    image, os_type = body.get("image"), body.get("os_type")
    if image and os_type and image != os_type:
        raise ValidationFailed(
            f"'image' ({image!r}) and its alias 'os_type' ({os_type!r}) name different images; "
            "send one of them",
            field="os_type",
            reason="conflicting_fields",
        )
    return image or os_type


@dataclass(frozen=True)
class CreateVM(Request):
    """``POST /twarga/api/vms``: a new VM; absent sizes are the smallest allowed."""

    required: ClassVar[tuple[str, ...]] = ("name",)

    name: str = field(metadata=wire(f"The VM's name: {NAME_DOC}", str))
    image: str | None = field(
        default=None,
        metadata=wire(
            "The image to boot (GET /twarga/api/images); default: the server's default.",
            str,
            aliases=("os_type",),
        ),
    )
    # The seed's (Twarga Cloud's) name for ``image``; kept apart so that an unknown image
    # is reported under the name the caller used.
    os_type: str | None = field(default=None, metadata=wire("", str, internal=True))
    ram: int | None = field(default=None, metadata=wire("RAM in MB.", int))
    cpu: int | None = field(default=None, metadata=wire("vCPUs.", int))
    disk: int | None = field(
        default=None, metadata=wire("Disk in GB (at least what the image needs).", int)
    )

    @property
    def image_name(self) -> str | None:
        """The image the body names (``image`` or ``os_type``), None for the default."""
        return self.image or self.os_type

    @property
    def image_field(self) -> str:
        """The body's key the image came from, for the ``field`` of a refusal."""
        return "image" if self.image else "os_type"

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape; 422 for a bad name (``invalid_name``) or
        ``image`` and ``os_type`` naming different images (``conflicting_fields``)."""
        checked = cls.checked_body(body)
        validate_name(checked["name"])
        requested_image(checked)
        return cls(**checked)


@dataclass(frozen=True)
class CloneVM(Request):
    """``POST /twarga/api/vms/{id}/clone``: a copy of a stopped VM under a new name (its
    image and sizes are the source's)."""

    required: ClassVar[tuple[str, ...]] = ("name",)

    name: str = field(metadata=wire(f"The new VM's name: {NAME_DOC}", str))

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape, 422 (``invalid_name``) for a bad name."""
        checked = cls.checked_body(body)
        validate_name(checked["name"])
        return cls(**checked)


@dataclass(frozen=True)
class UpdateVM(Request):
    """``PATCH /twarga/api/vms/{id}``: rename, or resize while stopped."""

    name: str | Unset = field(default=UNSET, metadata=wire(f"A new name: {NAME_DOC}", str))
    ram: int | Unset = field(
        default=UNSET, metadata=wire("RAM in MB (the VM must be stopped).", int)
    )
    cpu: int | Unset = field(default=UNSET, metadata=wire("vCPUs (the VM must be stopped).", int))

    def changes(self) -> dict[str, Any]:
        """The fields the body named, with their new values."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: value for name, value in values.items() if value is not UNSET}

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape, 422 (``invalid_name``) for a bad name."""
        checked = cls.checked_body(body)
        if "name" in checked:
            validate_name(checked["name"])
        return cls(**checked)


@dataclass(frozen=True)
class VMAction(Request):
    """``POST /twarga/api/vms/{id}/action`` (and a snapshot's: ``revert``)."""

    required: ClassVar[tuple[str, ...]] = ("action",)

    action: str = field(
        metadata=wire("start, stop, restart, force-stop or destroy (snapshots: revert).", str)
    )

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape (the service refuses unknown actions)."""
        return cls(**cls.checked_body(body))


@dataclass(frozen=True)
class CreateSnapshot(Request):
    """``POST /twarga/api/vms/{id}/snapshots``."""

    required: ClassVar[tuple[str, ...]] = ("name",)

    name: str = field(metadata=wire("The snapshot's name, unique on its VM.", str))

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """400 for a body of the wrong shape (the service checks the name)."""
        return cls(**cls.checked_body(body))
