"""Tornado handlers, one module per resource. ``ROUTES`` is the one route table: the app
registers it and a test walks it to check authentication and ownership."""

from __future__ import annotations

from twarga_lab.handlers import (
    admin,
    console,
    hosts,
    images,
    labs,
    me,
    metrics,
    snapshots,
    soc,
    vms,
)  # fmt: skip
from twarga_lab.handlers import openapi as openapi_doc

ROUTES = [
    *me.default_handlers,
    *vms.default_handlers,
    *snapshots.default_handlers,
    *console.default_handlers,
    *images.default_handlers,
    *admin.default_handlers,
    *metrics.default_handlers,
    *soc.default_handlers,
    *labs.default_handlers,
    *hosts.default_handlers,
    *openapi_doc.default_handlers,
]

__all__ = ["ROUTES"]
