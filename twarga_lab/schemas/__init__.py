"""Typed API requests: one frozen dataclass per request body or query string.

Handlers parse a request once (``from_body`` for a JSON body, ``from_query`` for a query
string) and hand the typed request to the service, which trusts it. Shape errors are 400
(``bad_body``, ``unknown_field``, ``missing_field``, ``bad_type``); values that are out of
bounds or contradict each other are 422 with their ``field``. Checks that need the server's
state or settings (an image's existence, VM size bounds, whether a user exists) stay in the
services. Every schema lists its fields with ``describe()``, for the OpenAPI document.

Modules by resource: ``vms`` (create, change, actions, snapshots), ``me`` (SSH key),
``admin`` (credits, quotas), ``soc`` (event listings and exports), ``metrics`` (history)
and ``base`` (the machinery).
"""

from twarga_lab.schemas.admin import GrantCredits, SetQuota, UpdateHost
from twarga_lab.schemas.base import MAX_INT, UNSET, FieldDoc, Request, Unset, check_types
from twarga_lab.schemas.labs import CreateDeployment, CreateLab, LabAction
from twarga_lab.schemas.me import SetSSHKey, validate_ssh_key
from twarga_lab.schemas.metrics import HistoryQuery, parse_time
from twarga_lab.schemas.soc import EventQuery
from twarga_lab.schemas.vms import (
    CloneVM,
    CreateSnapshot,
    CreateVM,
    UpdateVM,
    VMAction,
    validate_name,
)

SCHEMAS: tuple[type[Request], ...] = (
    CreateVM, CloneVM, UpdateVM, VMAction, CreateSnapshot, SetSSHKey, GrantCredits, SetQuota,
    EventQuery, HistoryQuery, CreateLab, LabAction, CreateDeployment, UpdateHost,
)  # fmt: skip

__all__ = [
    "MAX_INT",
    "SCHEMAS",
    "UNSET",
    "CloneVM",
    "CreateDeployment",
    "CreateLab",
    "CreateSnapshot",
    "CreateVM",
    "EventQuery",
    "FieldDoc",
    "GrantCredits",
    "HistoryQuery",
    "LabAction",
    "Request",
    "SetQuota",
    "SetSSHKey",
    "Unset",
    "UpdateHost",
    "UpdateVM",
    "VMAction",
    "check_types",
    "parse_time",
    "validate_name",
    "validate_ssh_key",
]
