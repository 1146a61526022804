"""Business logic, no tornado. Each service takes a :class:`~twarga_lab.db.Database` and,
where it needs one, a hypervisor backend."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    """Who is asking: a Jupyter/Hub user name and whether they are an admin."""

    name: str
    admin: bool = False
