"""The OpenAPI 3.1 document of Twarga Lab's REST API, built from the route table.

``build_document(routes)`` walks the handlers' route table (``handlers.ROUTES``: tornado
patterns with named groups and handler classes), takes each handler class's own methods
(``get``, ``post``, ... defined in Twarga Lab's code), and describes every operation from
``OPERATIONS``: its summary, request body or query (from the ``twarga_lab.schemas``
request classes, through their ``describe()``), its answer and every error status it can
give. The response schemas of the resources (VM, lab, event, error ...) are JSON Schema
dicts below. No tornado here: the handler passes the route table in.

A route or method missing from ``OPERATIONS`` is an error (``UndocumentedRoute``), so the
document and the route table cannot drift apart silently.

Why it is long: it is the API's reference: one entry per operation and one JSON Schema per
resource, kept together so that a reader sees the whole contract in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twarga_lab.db.models import VMStatus
from twarga_lab.schemas import (
    MAX_INT,
    CloneVM,
    CreateDeployment,
    CreateLab,
    CreateSnapshot,
    CreateVM,
    EventQuery,
    FieldDoc,
    GrantCredits,
    HistoryQuery,
    LabAction,
    Request,
    SetQuota,
    SetSSHKey,
    UpdateHost,
    UpdateVM,
    VMAction,
)
from twarga_lab.schemas.labs import LAB_ACTIONS, LAB_NAME_RE
from twarga_lab.schemas.vms import VM_NAME_RE
from twarga_lab.services.snapshots import SNAPSHOT_ACTIONS
from twarga_lab.services.vms.lifecycle import ACTIONS
from twarga_lab.virt.hosts import HostState

OPENAPI_VERSION = "3.1.0"
METHODS = ("get", "post", "put", "patch", "delete")
JSON = "application/json"
SECURITY = [{"hubToken": []}]

# -- response schemas ------------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


STRING = {"type": "string"}
NSTRING = {"type": ["string", "null"]}
NINT = {"type": ["integer", "null"]}
NUMBER = {"type": "number"}
TIME = {"type": "string", "format": "date-time"}
NTIME = {"type": ["string", "null"], "format": "date-time"}
OBJECT = {"type": "object"}


def _object(required: Sequence[str], **properties: Any) -> dict[str, Any]:
    """An object with ``properties`` of which ``required`` must be there; other keys are
    allowed (new fields must not break clients)."""
    return {"type": "object", "required": list(required), "properties": properties}


QUOTA = _object(
    ("max_vms", "max_ram_mb", "max_cpu", "max_disk_gb"),
    max_vms=NINT,
    max_ram_mb=NINT,
    max_cpu=NINT,
    max_disk_gb=NINT,
)
USAGE = _object(
    ("vms", "ram_mb", "cpu", "disk_gb"),
    vms={"type": "integer"},
    ram_mb={"type": "integer"},
    cpu={"type": "integer"},
    disk_gb={"type": "integer"},
    snapshot_disk_gb={"type": "integer"},
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        **_object(
            ("message", "reason"),
            message={"type": "string", "description": "A sentence for people."},
            reason={"type": "string", "description": "A short machine-readable code."},
            field={"type": "string", "description": "The request field at fault (422)."},
        ),
        "description": "Every refusal: 400, 401, 403, 404, 409, 413, 422, 503.",
    },
    "Quota": QUOTA,
    "Usage": USAGE,
    "Me": _object(
        ("name", "admin", "credits", "quota", "usage"),
        name=STRING,
        admin={"type": "boolean"},
        credits=NUMBER,
        quota=_ref("Quota"),
        usage=_ref("Usage"),
        ssh_public_key=NSTRING,
        created_at=NTIME,
    ),
    "VM": _object(
        ("id", "name", "owner", "status", "image", "ram", "cpu", "disk", "created_at"),
        id={"type": "integer"},
        name=STRING,
        owner=STRING,
        status={"type": "string", "enum": [s.value for s in VMStatus]},
        status_message=NSTRING,
        image=STRING,
        os_type=STRING,
        os_family=NSTRING,
        ram={"type": "integer", "description": "MB"},
        cpu={"type": "integer"},
        disk={"type": "integer", "description": "GB"},
        ip_address=NSTRING,
        ssh_host=NSTRING,
        ssh_port=NINT,
        domain=NSTRING,
        created_at=TIME,
        host={"type": "string", "description": "The hypervisor host it lives on."},
        started_at=NTIME,
        uptime={"type": "number", "description": "seconds"},
        ready={"type": "boolean"},
        idle_stop_at=NTIME,
        lab_id=NINT,
        lab_name=NSTRING,
        lab_machine=NSTRING,
        addresses={"type": "object", "additionalProperties": STRING},
    ),
    "Credentials": _object(
        ("username", "password"),
        username=STRING,
        password=STRING,
        ssh_host=NSTRING,
        ssh_port=NINT,
        ssh_port_moved=NINT,
        ssh_host_key=NSTRING,
        ssh_host_key_fingerprint=NSTRING,
    ),
    "Snapshot": _object(("name", "created_at"), name=STRING, created_at=TIME, state=NSTRING),
    "Image": _object(
        ("name",),
        name=STRING,
        kind=STRING,
        os_type=NSTRING,
        description=NSTRING,
        cloud_init={"type": "boolean"},
        min_disk_gb={"type": "number"},
        default={"type": "boolean"},
    ),
    "HostMetrics": _object(
        ("cpu", "memory", "disk", "network", "timestamp"),
        cpu=OBJECT,
        memory=OBJECT,
        disk=OBJECT,
        network=OBJECT,
        timestamp=TIME,
    ),
    "VMMetrics": _object(
        ("vm_id", "cpu_usage", "memory_usage", "disk_usage", "uptime", "ip"),
        vm_id={"type": "integer"},
        name=STRING,
        status=STRING,
        cpu_usage=NUMBER,
        memory_usage=NUMBER,
        disk_usage=NUMBER,
        uptime={"type": "number"},
        ip=NSTRING,
        timestamp=TIME,
    ),
    "History": _object(
        ("entity", "metric", "since", "until", "points"),
        entity={"type": "string", "enum": ["host", "vm"]},
        id=NINT,
        metric=STRING,
        unit=NSTRING,
        resolution=STRING,
        step={"type": ["number", "null"]},
        since=TIME,
        until=TIME,
        points={"type": "array"},
    ),
    "Event": _object(
        ("id", "created_at", "type", "severity", "message"),
        id={"type": "integer"},
        created_at=TIME,
        type={"type": "string", "enum": ["vm", "auth", "system", "security"]},
        severity={"type": "string", "enum": ["info", "warning", "critical"]},
        message=STRING,
        user_name=NSTRING,
        vm_id=NINT,
        source=NSTRING,
        details={"type": ["object", "null"]},
    ),
    "Statistics": _object(
        ("total_events", "by_severity", "by_type"),
        total_events={"type": "integer"},
        by_severity={"type": "object", "additionalProperties": {"type": "integer"}},
        by_type={"type": "object", "additionalProperties": {"type": "integer"}},
        recent_critical=_array("Event"),
        per_hour={"type": "array", "items": OBJECT},
        top_sources={"type": "array"},
        active_bans={"type": "integer"},
    ),
    "Ban": _object(
        ("scope", "source", "ban_count", "banned_until", "active"),
        scope=STRING,
        vm_id=NINT,
        vm_name=NSTRING,
        source=STRING,
        ban_count={"type": "integer"},
        banned_until=TIME,
        last_banned_at=TIME,
        active={"type": "boolean"},
        enforced={"type": "boolean"},
    ),
    "UserRow": _object(
        ("name", "credits", "vm_count", "quota"),
        name=STRING,
        credits=NUMBER,
        vm_count={"type": "integer"},
        usage=_ref("Usage"),
        quota=_ref("Quota"),
        active={"type": "boolean"},
        approved={"type": ["boolean", "null"]},
        created_at=NTIME,
        last_seen=NTIME,
    ),
    "LedgerEntry": _object(
        ("id", "amount", "balance_after", "reason", "created_at"),
        id={"type": "integer"},
        amount=NUMBER,
        balance_after=NUMBER,
        reason=STRING,
        actor=NSTRING,
        created_at=TIME,
    ),
    "Grant": _object(("name", "new_balance"), name=STRING, new_balance=NUMBER),
    "UserQuota": _object(("name", "quota"), name=STRING, quota=_ref("Quota")),
    "LabTemplate": _object(
        ("name", "machines"),
        schema=STRING,
        name=STRING,
        title=NSTRING,
        description=NSTRING,
        networks={"type": "array", "items": OBJECT},
        machines={"type": "array", "items": OBJECT},
        checks={"type": "array", "items": OBJECT},
    ),
    "Lab": _object(
        ("id", "name", "owner", "template", "status", "networks", "vms"),
        id={"type": "integer"},
        name=STRING,
        owner=STRING,
        template=STRING,
        title=NSTRING,
        status={
            "type": "string",
            "description": "Its VMs' status when they agree; else pending, error or partial.",
        },
        deployment_id=NINT,
        created_at=TIME,
        destroyed_at=NTIME,
        networks={
            "type": "array",
            "items": _object(("name", "cidr"), name=STRING, cidr=STRING),
        },
        vms=_array("VM"),
        checks={"type": "array", "items": STRING},
    ),
    "CheckOutcome": _object(
        ("check", "machine", "passed", "points", "score"),
        check=STRING,
        machine=STRING,
        passed={"type": "boolean"},
        points=NUMBER,
        score=NUMBER,
        exit_code=NINT,
        output=STRING,
        error=NSTRING,
    ),
    "LabGrade": _object(
        ("lab_id", "results", "score", "max_score"),
        lab_id={"type": "integer"},
        lab=STRING,
        owner=STRING,
        results=_array("CheckOutcome"),
        score=NUMBER,
        max_score=NUMBER,
    ),
    "Deployment": _object(
        ("id", "name", "group", "template", "labs"),
        id={"type": "integer"},
        name=STRING,
        group=STRING,
        template=STRING,
        created_by=STRING,
        created_at=TIME,
        students={"type": "array", "items": STRING},
        labs=_array("Lab"),
        refused={"type": "object", "additionalProperties": _ref("Error")},
    ),
    "DeploymentGrades": _object(
        ("deployment_id", "labs"),
        deployment_id={"type": "integer"},
        name=STRING,
        group=STRING,
        template=STRING,
        labs=_array("LabGrade"),
    ),
    "Host": _object(
        ("name", "uri", "state", "draining", "vms"),
        name=STRING,
        uri=STRING,
        state={"type": "string", "enum": [s.value for s in HostState]},
        draining={"type": "boolean"},
        default={"type": "boolean"},
        hostname=NSTRING,
        arch=NSTRING,
        vcpus=NINT,
        memory_mb=NINT,
        vms={"type": "integer"},
        vcpus_used={"type": "integer"},
        ram_used_mb={"type": "integer"},
        ram_free_mb=NINT,
        disk_total_gb={"type": ["number", "null"]},
        disk_free_gb={"type": ["number", "null"]},
        disk_used_gb={"type": "integer"},
        storage={"type": "string", "enum": ["shared", "own"]},
        domain_type={"type": ["string", "null"], "enum": ["kvm", "qemu", None]},
        cpu_usage_percent={"type": ["number", "null"]},
        memory_available_mb=NINT,
        images={
            "type": "array",
            "description": "Copies of images on a host with storage of its own.",
            "items": _object(
                ("image", "state", "bytes", "total_bytes", "percent"),
                image=STRING,
                state={"type": "string", "enum": ["copying", "ready", "failed"]},
                bytes={"type": "integer"},
                total_bytes={"type": "integer"},
                percent=NUMBER,
                seconds={"type": ["number", "null"]},
                error=NSTRING,
            ),
        },
    ),
    "OpenAPI": {"type": "object", "required": ["openapi", "paths"]},
}

ERROR_TEXT = {
    400: "Malformed request: not JSON, a missing or unknown field, a value of the wrong type.",
    401: "Not authenticated: send `Authorization: token <token>`.",
    403: "Authenticated but not allowed (an admin route, or the Hub's scopes).",
    404: "No such thing, or it belongs to someone else.",
    409: "Contradicts the current state or a quota (a taken name, a VM in the wrong state).",
    413: "The request body is too large.",
    422: "A value is out of bounds or unknown (see `field`).",
    426: "Only websocket version 13 is spoken here.",
    503: "A backend (libvirt, the database) cannot be reached right now.",
}

# What the parsers check beyond a field's JSON type, as JSON Schema keywords (the services'
# bounds that depend on settings, such as VM sizes, are not in the document).
VM_NAME = {"pattern": VM_NAME_RE.pattern}
LAB_NAME = {"pattern": f"^{LAB_NAME_RE.pattern}$"}
FIELD_RULES: dict[tuple[type[Request], str], dict[str, Any]] = {
    (CreateVM, "name"): VM_NAME,
    (CloneVM, "name"): VM_NAME,
    (UpdateVM, "name"): VM_NAME,
    (CreateLab, "name"): LAB_NAME,
    (CreateDeployment, "name"): LAB_NAME,
    (LabAction, "action"): {"enum": list(LAB_ACTIONS)},
}

# -- operations ------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation as the document describes it."""

    summary: str
    status: int = 200
    # A component schema name (or a literal schema); None: no body (204, 101).
    response: str | dict[str, Any] | None = None
    media: str = JSON
    body: type[Request] | str | None = None  # a request schema, or "empty" (no fields)
    query: type[Request] | None = None
    params: tuple[dict[str, Any], ...] = ()
    errors: tuple[int, ...] = ()
    admin: bool = False
    security: tuple[str, ...] = ("hubToken",)
    headers: tuple[str, ...] = ()
    description: str = ""
    # Keywords added to body fields for this operation only (a shared schema's enum).
    rules: tuple[tuple[str, dict[str, Any]], ...] = ()


ALL_PARAM = {
    "name": "all",
    "in": "query",
    "required": False,
    "description": "Admins: everyone's (1, true or yes); ignored for others.",
    "schema": {"type": "string", "enum": ["0", "1", "true", "false", "yes", "no"]},
}
WRITE = (400, 413, 422)  # a JSON body can be malformed, too large or out of bounds

# (handler class name, method) -> its operation.
OPERATIONS: dict[tuple[str, str], Op] = {
    ("MeHandler", "get"): Op("Who I am: credits, quota and usage", response="Me"),
    ("MeHandler", "patch"): Op(
        "Set or remove my SSH public key", response="Me", body=SetSSHKey, errors=WRITE
    ),
    ("VMListHandler", "get"): Op(
        "My VMs (admins: everyone's with ?all=1)", response=_array("VM"), params=(ALL_PARAM,)
    ),
    ("VMListHandler", "post"): Op(
        "Create a VM (it boots in the background: pending, then running)",
        status=201,
        response="VM",
        body=CreateVM,
        errors=(*WRITE, 404, 409),
        headers=("Location",),
    ),
    ("VMHandler", "get"): Op("One VM", response="VM", errors=(404,)),
    ("VMHandler", "patch"): Op(
        "Rename a VM, or resize it while stopped",
        response="VM",
        body=UpdateVM,
        errors=(*WRITE, 404, 409),
    ),
    ("VMHandler", "delete"): Op("Destroy a VM", status=204, errors=(404, 409)),
    ("VMActionHandler", "post"): Op(
        "start, stop, restart, force-stop or destroy a VM",
        response="VM",
        body=VMAction,
        errors=(*WRITE, 404, 409),
        rules=(("action", {"enum": list(ACTIONS)}),),
    ),
    ("VMCloneHandler", "post"): Op(
        "Copy a stopped VM under a new name",
        status=201,
        response="VM",
        body=CloneVM,
        errors=(*WRITE, 404, 409),
        headers=("Location",),
    ),
    ("VMCredentialsHandler", "get"): Op(
        "Root's password and the SSH forward of my VM (its owner only)",
        response="Credentials",
        errors=(404, 409),
    ),
    ("SnapshotListHandler", "get"): Op(
        "A VM's snapshots", response=_array("Snapshot"), errors=(404, 409)
    ),
    ("SnapshotListHandler", "post"): Op(
        "Take a snapshot",
        status=201,
        response="Snapshot",
        body=CreateSnapshot,
        errors=(*WRITE, 404, 409),
        headers=("Location",),
    ),
    ("SnapshotHandler", "post"): Op(
        'Revert the VM to this snapshot ({"action": "revert"})',
        response="VM",
        body=VMAction,
        errors=(*WRITE, 404, 409),
        rules=(("action", {"enum": list(SNAPSHOT_ACTIONS)}),),
    ),
    ("SnapshotHandler", "delete"): Op("Delete a snapshot", status=204, errors=(404, 409)),
    ("VMConsoleSocket", "get"): Op(
        "The VM's serial console as a websocket (terminado's protocol)",
        status=101,
        errors=(400, 404, 409, 426),
        description="Send `Upgrade: websocket` with the token in the Authorization header "
        '(never in the URL) from an allowed Origin. Messages in: `["stdin", text]`, '
        '`["set_size", rows, cols]`; out: `["setup", {}]`, `["stdout", text]`, '
        '`["disconnect", 1]`. A plain GET is refused with 400.',
    ),
    ("ImagesHandler", "get"): Op("Bootable images", response=_array("Image")),
    ("AdminUsersHandler", "get"): Op(
        "Every user with credits, usage and quota", response=_array("UserRow"), admin=True
    ),
    ("AdminCreditsHandler", "get"): Op(
        "A user's credit ledger, newest first",
        response=_array("LedgerEntry"),
        errors=(404,),
        admin=True,
    ),
    ("AdminCreditsHandler", "post"): Op(
        "Grant (or, negative, take) credits with a reason",
        response="Grant",
        body=GrantCredits,
        errors=(*WRITE, 404, 409),
        admin=True,
    ),
    ("AdminQuotaHandler", "patch"): Op(
        "Change a user's limits",
        response="UserQuota",
        body=SetQuota,
        errors=(*WRITE, 404),
        admin=True,
    ),
    ("HostMetricsHandler", "get"): Op(
        "The host's CPU, memory, disk and network now", response="HostMetrics"
    ),
    ("VMMetricsHandler", "get"): Op("A VM's readings now", response="VMMetrics", errors=(404,)),
    ("MetricsHistoryHandler", "get"): Op(
        "A metric of the host or a VM over a window",
        response="History",
        query=HistoryQuery,
        errors=(400, 404, 422),
    ),
    ("PrometheusHandler", "get"): Op(
        "Prometheus text exposition (a scraper with the scrape token, or an admin)",
        response=STRING,
        media="text/plain",
        security=("scrapeToken", "hubToken"),
        admin=True,
    ),
    ("EventsHandler", "get"): Op(
        "Security events (mine; admins: all), newest first",
        response=_array("Event"),
        query=EventQuery,
        errors=(400, 422),
    ),
    ("EventsExportHandler", "get"): Op(
        "The same events as a CSV download",
        response=STRING,
        media="text/csv",
        query=EventQuery,
        errors=(400, 422),
    ),
    ("EventsJSONLinesHandler", "get"): Op(
        "The same events as JSON lines",
        response=STRING,
        media="application/x-ndjson",
        query=EventQuery,
        errors=(400, 422),
    ),
    ("StatisticsHandler", "get"): Op(
        "Event totals by severity and type", response="Statistics", admin=True
    ),
    ("BansHandler", "get"): Op("Bans on my VMs (admins: every ban)", response=_array("Ban")),
    ("LabTemplateListHandler", "get"): Op("Lab templates", response=_array("LabTemplate")),
    ("LabListHandler", "get"): Op(
        "My labs (admins: everyone's with ?all=1)", response=_array("Lab"), params=(ALL_PARAM,)
    ),
    ("LabListHandler", "post"): Op(
        "Make a lab from a template: every VM and network, all or nothing",
        status=201,
        response="Lab",
        body=CreateLab,
        errors=(*WRITE, 404, 409),
        headers=("Location",),
    ),
    ("LabHandler", "get"): Op("One lab, its VMs and networks", response="Lab", errors=(404,)),
    ("LabHandler", "delete"): Op("Destroy a lab", status=204, errors=(404, 409)),
    ("LabActionHandler", "post"): Op(
        "start, stop or destroy every VM of a lab",
        response="Lab",
        body=LabAction,
        errors=(*WRITE, 404, 409),
    ),
    ("LabCheckHandler", "post"): Op(
        "Run a lab's checks now and grade them",
        response="LabGrade",
        body="empty",
        errors=(400, 413, 404, 409),
    ),
    ("DeploymentListHandler", "get"): Op(
        "Deployments I made (admins: all)", response=_array("Deployment")
    ),
    ("DeploymentListHandler", "post"): Op(
        "A lab from a template for every member of a Hub group",
        status=201,
        response="Deployment",
        body=CreateDeployment,
        errors=(*WRITE, 404, 409),
        headers=("Location",),
    ),
    ("DeploymentHandler", "get"): Op(
        "One deployment with every student's lab", response="Deployment", errors=(404,)
    ),
    ("DeploymentCheckHandler", "post"): Op(
        "Grade every student's lab of a deployment",
        response="DeploymentGrades",
        body="empty",
        errors=(400, 413, 404, 409),
    ),
    ("HostListHandler", "get"): Op(
        "The hypervisor hosts: state, capacity and what their VMs use",
        response=_array("Host"),
        admin=True,
    ),
    ("HostHandler", "get"): Op("One hypervisor host", response="Host", errors=(404,), admin=True),
    ("HostHandler", "patch"): Op(
        "Drain a host (no new VMs) or take it back",
        response="Host",
        body=UpdateHost,
        errors=(*WRITE, 404),
        admin=True,
    ),
    ("OpenAPIHandler", "get"): Op("This document", response="OpenAPI"),
}


class UndocumentedRoute(LookupError):
    """A route's method has no entry in ``OPERATIONS``."""


# -- building ----------------------------------------------------------------------------

_GROUP = re.compile(r"\(\?P<(?P<name>\w+)>(?P<regex>[^)]*)\)")


def handler_methods(handler: type) -> list[str]:
    """The HTTP methods ``handler`` answers: those defined in Twarga Lab's own code (the
    web framework's defaults answer 405)."""
    found = []
    for method in METHODS:
        fn = getattr(handler, method, None)
        if fn is not None and getattr(fn, "__module__", "").startswith("twarga_lab."):
            found.append(method)
    return found


def openapi_path(pattern: str) -> tuple[str, list[dict[str, Any]]]:
    """A tornado pattern as an OpenAPI path (``{vm_id}``) and its path parameters."""
    params = []
    for group in _GROUP.finditer(pattern):
        integer = group["regex"] == r"\d+"
        schema: dict[str, Any] = (
            {"type": "integer", "minimum": 0, "maximum": MAX_INT}
            if integer
            else {"type": "string", "minLength": 1}
        )
        if not integer:
            schema["pattern"] = "^[^/]+$"
        params.append({"name": group["name"], "in": "path", "required": True, "schema": schema})
    path = _GROUP.sub(lambda g: "{" + g["name"] + "}", pattern).lstrip("^").rstrip("$")
    return path.replace("\\", ""), params


def _field_schema(doc: FieldDoc, *, query: bool = False) -> dict[str, Any]:
    types = [t for t in doc.types if not (query and t == "null")]
    schema: dict[str, Any] = {"type": types[0] if len(types) == 1 else types}
    if "integer" in types and "number" not in types:
        schema["maximum"] = MAX_INT  # the database's integers
    if doc.doc:
        schema["description"] = doc.doc
    if doc.default is not None:
        schema["default"] = doc.default
    return schema


def body_schema(
    request: type[Request], rules: Iterable[tuple[str, dict[str, Any]]] = ()
) -> dict[str, Any]:
    """The JSON Schema of a request body: its fields and the seed's aliases, nothing else
    (with ``FIELD_RULES`` and an operation's own ``rules``)."""
    extra = dict(rules)
    properties: dict[str, Any] = {}
    for doc in request.describe():
        properties[doc.name] = {
            **_field_schema(doc),
            **FIELD_RULES.get((request, doc.name), {}),
            **extra.get(doc.name, {}),
        }
        for alias in doc.aliases:
            properties[alias] = {**_field_schema(doc), "description": f"Alias of {doc.name!r}."}
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if request.__doc__:
        schema["description"] = " ".join(request.__doc__.split())
    if request.required:
        schema["required"] = list(request.required)
    return schema


def query_parameters(request: type[Request]) -> list[dict[str, Any]]:
    """A query schema's fields (and aliases) as OpenAPI query parameters."""
    params = []
    for doc in request.describe():
        for name in (doc.name, *doc.aliases):
            schema = _field_schema(doc, query=True)
            if name == "limit" and request is EventQuery:
                schema = {"anyOf": [{"type": "integer"}, {"const": "all"}], **schema}
                del schema["type"]
            if name != doc.name:
                schema["description"] = f"Alias of {doc.name!r} (the seed's name)."
            params.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in request.required,
                    "schema": schema,
                }
            )
    return params


def _response(status: int, description: str, schema: Any, media: str = JSON) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description}
    if schema is not None:
        answer["content"] = {media: {"schema": _ref(schema) if isinstance(schema, str) else schema}}
    return answer


def operation(handler: str, method: str, path_params: list[dict[str, Any]]) -> dict[str, Any]:
    """The OpenAPI operation object of ``handler.method``."""
    op = OPERATIONS.get((handler, method))
    if op is None:
        raise UndocumentedRoute(f"{handler}.{method} is not in twarga_lab.openapi.OPERATIONS")
    success = _response(op.status, "OK" if op.status < 300 else op.summary, op.response, op.media)
    if op.status == 204:
        success["description"] = "Done; no body."
    if op.status == 101:
        success["description"] = "Switching protocols: the console is attached."
    for header in op.headers:
        success.setdefault("headers", {})[header] = {
            "description": "The URL of the new resource.",
            "schema": {"type": "string"},
        }
    responses: dict[str, Any] = {str(op.status): success}
    errors = {401, 403, 503, *op.errors}
    for status in sorted(errors):
        text = ERROR_TEXT[status]
        if status == 403 and op.admin:
            text = "Not an admin. " + text
        responses[str(status)] = _response(status, text, "Error")
    doc: dict[str, Any] = {
        "operationId": f"{handler}.{method}",
        "summary": op.summary,
        "tags": [handler.removesuffix("Handler").removesuffix("Socket")],
        "security": [{name: []} for name in op.security],
        "responses": responses,
    }
    if op.description:
        doc["description"] = op.description
    params = [*path_params, *op.params]
    if op.query is not None:
        params.extend(query_parameters(op.query))
    if params:
        doc["parameters"] = params
    if op.body == "empty":
        doc["requestBody"] = {
            "required": False,
            "content": {JSON: {"schema": {"type": "object", "maxProperties": 0}}},
        }
    elif op.body is not None:
        assert isinstance(op.body, type)
        schema = body_schema(op.body, op.rules)
        doc["requestBody"] = {"required": True, "content": {JSON: {"schema": schema}}}
    return doc


def build_document(routes: Iterable[tuple[Any, ...]], server_url: str = "/") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes`` (``(pattern, handler_class, ...)`` tuples),
    served under ``server_url`` (the server's base URL)."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        pattern, handler = route[0], route[1]
        path, path_params = openapi_path(pattern)
        item = paths.setdefault(path, {})
        for method in handler_methods(handler):
            item[method] = operation(handler.__name__, method, path_params)
    return {
        "openapi": OPENAPI_VERSION,
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "Twarga Lab",
            "version": _version(),
            "description": "VMs, labs, metrics and the security-event log of Twarga Lab. "
            "Errors are JSON {message, reason, field?}; a VM that belongs to someone else "
            "answers 404.",
        },
        "servers": [{"url": server_url.rstrip("/") or "/"}],
        "security": SECURITY,
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "hubToken": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "`Authorization: token <JupyterHub or Jupyter token>` "
                    "(or the Hub's OAuth cookie in a browser).",
                },
                "scrapeToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <metrics_scrape_token>` "
                    "(/twarga/metrics only).",
                },
            },
        },
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twarga-lab")
    except PackageNotFoundError:
        return "0"
