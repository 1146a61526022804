"""The Python API of Twarga Lab, for notebooks.

Inside a Hub user's server or a personal ``jupyter lab`` it needs no arguments::

    >>> from twarga_lab.client import Lab
    >>> lab = Lab()
    >>> lab.me()["credits"]
    1000.0
    >>> vm = lab.vms.create("web-1", ram=1024, cpu=1, disk=10)
    >>> vm.wait("running", timeout=120)          # a progress bar in a notebook
    >>> vm.wait("ready")                         # booted: its guest reported in
    >>> print(vm.run("uname -a"))                # one command on the serial console
    Linux web-1 6.1.0-... x86_64 GNU/Linux
    >>> vm.snapshot("s1"); vm.snapshots(); vm.revert("s1"); vm.delete_snapshot("s1")
    >>> vm.stop(); vm.start(); vm.destroy()
    >>> lab.vms.list()                           # [VM(...), ...]
    >>> lab.metrics.host()                       # host CPU, memory, disk, network
    >>> lab.metrics.history("cpu_usage", vm=vm, since="-1h")   # a pandas DataFrame
    >>> lab.soc.events(limit=50)                 # a pandas DataFrame
    >>> lab.admin.users()                        # admins only
    >>> mine = lab.create_lab("attack-defend", "mine")   # a lab: several VMs, own network
    >>> mine.wait("running"); mine.vms; mine.check()      # checks as a DataFrame
    >>> course = lab.deploy("attack-defend", "sec101", "tp1")  # one lab per group member
    >>> course.check(); course.grades()                  # teacher: grade per student

Errors from the service become exceptions carrying its message: :class:`BadRequest`
(400), :class:`AuthenticationError` (401), :class:`PermissionDenied` (403),
:class:`VMNotFound` / :class:`NotFound` (404), :class:`Conflict` and :class:`QuotaExceeded`
(409), :class:`ValidationError` (422, with ``.field``), :class:`ServiceUnavailable` (503),
all subclasses of :class:`TwargaAPIError`. Calls are synchronous; ``wait_async`` and
``run_async`` are there for notebooks that keep working while a VM boots.

Why it is long: it is the notebook's whole public API (Lab, VMs, labs, deployments, images,
metrics, SOC, admin), one import and one help() page for users; it holds no logic beyond
HTTP calls and their typed results, and the serial-console protocol lives in serial_console.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlparse

import httpx

from twarga_lab.serial_console import (
    ANSI_RE,
    ATTACHED_TEXT,
    PROMPT_RE,
    framed_command,
    framed_output,
)

__all__ = [
    "VM",
    "AuthenticationError",
    "BadRequest",
    "Conflict",
    "Deployment",
    "Lab",
    "LabInstance",
    "NotFound",
    "PermissionDenied",
    "QuotaExceeded",
    "ServiceUnavailable",
    "TwargaAPIError",
    "VMNotFound",
    "ValidationError",
]


class TwargaAPIError(Exception):
    """An error answer of the Twarga service: ``status``, ``reason``, ``message``."""

    def __init__(self, status: int, message: str, reason: str = "", field: str | None = None):
        super().__init__(f"{message} ({status} {reason})".strip())
        self.status = status
        self.message = message
        self.reason = reason
        self.field = field


class BadRequest(TwargaAPIError):
    """400: the request was malformed."""


class AuthenticationError(TwargaAPIError):
    """401: no or a wrong token."""


class PermissionDenied(TwargaAPIError):
    """403: not allowed (for instance, not an admin)."""


class NotFound(TwargaAPIError):
    """404: no such thing, or it is someone else's."""


class VMNotFound(NotFound, KeyError):
    """404 for a VM (also a KeyError, so ``lab.vms["x"]`` behaves like a mapping)."""


class Conflict(TwargaAPIError):
    """409: the request contradicts the current state (name taken, VM busy)."""


class QuotaExceeded(Conflict):
    """409: over a quota, or out of credits."""


class ValidationError(TwargaAPIError):
    """422: a value is out of bounds or unknown; ``field`` names it."""


class ServiceUnavailable(TwargaAPIError):
    """503 (or no answer): the service or libvirt cannot be reached."""


_BY_STATUS: dict[int, type[TwargaAPIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
    503: ServiceUnavailable,
}


def _error(status: int, body: Any, path: str) -> TwargaAPIError:
    if not isinstance(body, dict):
        body = {"message": str(body or "")[:300]}
    message = body.get("message") or f"HTTP {status}"
    reason = body.get("reason") or ""
    cls = _BY_STATUS.get(status, TwargaAPIError)
    if status == 409 and reason in ("quota_exceeded", "no_credits", "no_ports"):
        cls = QuotaExceeded
    if status == 404 and path.lstrip("/").startswith("vms"):
        cls = VMNotFound
    return cls(status, message, reason, body.get("field"))


def _discover() -> tuple[str, str]:
    """The service URL and a token, from the environment or the running Jupyter server."""
    token = os.environ.get("TWARGA_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN", "")
    url = os.environ.get("TWARGA_SERVICE_URL") or os.environ.get("TWARGA_URL")
    if url and token:
        return url, token
    # Personal mode: the kernel's own server (the newest one running here).
    from jupyter_server.serverapp import list_running_servers

    servers = sorted(list_running_servers(), key=lambda s: s.get("pid", 0), reverse=True)
    for server in servers:
        if server.get("token") or token:
            return server["url"], server.get("token") or token
    raise ServiceUnavailable(
        503,
        "no Twarga Lab service found: pass Lab(url=..., token=...), or set TWARGA_URL and "
        "TWARGA_TOKEN",
        "not_found",
    )


def _since(value: str | datetime | timedelta | None) -> str | None:
    """ISO time for ``since``/``until``: a datetime, a timedelta ago, or "-1h"/"-30m"."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = datetime.now(UTC) - value
    if isinstance(value, str):
        match = re.fullmatch(r"-(\d+)([smhd])", value.strip())
        if not match:
            return value
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        value = datetime.now(UTC) - timedelta(**{unit: int(match.group(1))})
    return value.isoformat()


class Lab:
    """A connection to Twarga Lab as one user.

    ``Lab()`` finds the service by itself in a Hub user's server (``$TWARGA_URL`` and
    ``$JUPYTERHUB_API_TOKEN``) and in personal mode (the running Jupyter server); pass
    ``url`` (the server or service base URL, e.g. ``http://127.0.0.1:8000/services/twarga/``)
    and ``token`` to go elsewhere.

    Attributes: ``vms`` (:class:`VMs`), ``metrics`` (:class:`Metrics`), ``soc``
    (:class:`SOC`), ``admin`` (:class:`Admin`). Labs (several VMs on private networks, made
    from a template) and class deployments: :meth:`lab_templates`, :meth:`labs`,
    :meth:`create_lab`, :meth:`get_lab`, :meth:`deployments`, :meth:`deploy`,
    :meth:`get_deployment`.
    """

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60):
        if url is None or token is None:
            found_url, found_token = _discover()
            url, token = url or found_url, token or found_token
        self.url = url.rstrip("/") + "/"
        self.token = token
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"token {token}"},
            timeout=timeout,
        )
        self.vms = VMs(self)
        self.metrics = Metrics(self)
        self.soc = SOC(self)
        self.admin = Admin(self)

    def __repr__(self) -> str:
        return f"Lab({self.url!r})"

    # -- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None) -> Any:
        """Call ``/twarga/api/<path>``; returns the decoded JSON (or None for 204)."""
        api_path = "twarga/api/" + path.lstrip("/")
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, api_path, json=body, params=params)
        except httpx.HTTPError as e:
            raise ServiceUnavailable(503, f"cannot reach {self.url}: {e}", "unreachable") from e
        if response.status_code == 204 or not response.content:
            if response.is_error:
                raise _error(response.status_code, None, path)
            return None
        try:
            data = response.json()
        except ValueError:
            data = response.text
        if response.is_error:
            raise _error(response.status_code, data, path)
        return data

    def text(self, path: str, params: dict | None = None) -> str:
        """GET a non-JSON resource (CSV, JSON lines) as text."""
        response = self._http.get("twarga/api/" + path.lstrip("/"), params=params)
        if response.is_error:
            raise _error(response.status_code, response.text, path)
        return response.text

    def me(self) -> dict[str, Any]:
        """Who I am: name, admin, credits, quota and usage."""
        return self.request("GET", "me")

    def images(self) -> list[dict[str, Any]]:
        """The bootable images."""
        return self.request("GET", "images")

    def set_ssh_key(self, key: str | None) -> dict[str, Any]:
        """Store my SSH public key (installed into the VMs I create next)."""
        return self.request("PATCH", "me", {"ssh_public_key": key})

    # -- labs and deployments -------------------------------------------------------------

    def lab_templates(self) -> list[dict[str, Any]]:
        """The lab templates I can make labs from (each with ``machines_count`` and
        ``vm_count``)."""
        return self.request("GET", "lab-templates")

    def labs(self, all: bool = False) -> list[LabInstance]:
        """My labs (admins: everyone's with ``all=True``)."""
        params = {"all": "1"} if all else None
        return [LabInstance(self, data) for data in self.request("GET", "labs", params=params)]

    def create_lab(
        self,
        template: str | dict[str, Any],
        name: str,
        wait: bool = False,
        timeout: float = 300,
        spread: bool = False,
    ) -> LabInstance:
        """Make lab ``name`` from ``template`` (a template's name, or a whole template as a
        dict): all its VMs and networks, or nothing. ``wait=True`` waits until all run.
        ``spread=True``: each machine on a different host (templates without networks)."""
        body: dict[str, Any] = {"template": _template_body(template), "name": name}
        if spread:
            body["spread"] = True
        lab = LabInstance(self, self.request("POST", "labs", body))
        return lab.wait("running", timeout) if wait else lab

    def get_lab(self, lab_id: int) -> LabInstance:
        """One lab by id (mine, or any for an admin or its deployment's teacher)."""
        return LabInstance(self, self.request("GET", f"labs/{int(lab_id)}"))

    def deployments(self) -> list[Deployment]:
        """The deployments I may see (admins: all; instructors: their groups')."""
        return [Deployment(self, data) for data in self.request("GET", "deployments")]

    def deploy(self, template: str | dict[str, Any], group: str, name: str) -> Deployment:
        """Give every member of Hub group ``group`` a lab ``name`` made from ``template``
        (admins, or the group's instructors)."""
        body = {"template": _template_body(template), "group": group, "name": name}
        return Deployment(self, self.request("POST", "deployments", body))

    def get_deployment(self, deployment_id: int) -> Deployment:
        """One deployment with all its labs (the teacher sees every student's copy)."""
        return Deployment(self, self.request("GET", f"deployments/{int(deployment_id)}"))

    def ws_url(self, path: str) -> str:
        """The websocket URL of an API path."""
        parsed = urlparse(self.url)
        scheme = "wss" if parsed.scheme == "https" else "ws"
        return f"{scheme}://{parsed.netloc}{parsed.path}twarga/api/{path.lstrip('/')}"


class VM:
    """One VM. Attributes mirror its JSON (``id``, ``name``, ``status``, ``ram`` ...);
    :meth:`refresh` reads them again."""

    def __init__(self, lab: Lab, data: dict[str, Any]) -> None:
        self._lab = lab
        self._data = data

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return f"VM(id={self.id}, name={self.name!r}, status={self.status!r})"

    def to_dict(self) -> dict[str, Any]:
        """The VM's JSON as last read."""
        return dict(self._data)

    def refresh(self) -> VM:
        """Read the VM again from the service."""
        self._data = self._lab.request("GET", f"vms/{self.id}")
        return self

    def _act(self, action: str) -> VM:
        self._data = self._lab.request("POST", f"vms/{self.id}/action", {"action": action})
        return self

    def start(self) -> VM:
        """Start (nothing happens if it runs)."""
        return self._act("start")

    def stop(self) -> VM:
        """Power off gracefully; forced after the service's timeout."""
        return self._act("stop")

    def force_stop(self) -> VM:
        """Pull the plug."""
        return self._act("force-stop")

    def restart(self) -> VM:
        """Stop gracefully, then start."""
        return self._act("restart")

    def destroy(self) -> None:
        """Remove the VM, its disk and its seed."""
        self._lab.request("DELETE", f"vms/{self.id}")
        self._data = {**self._data, "status": "destroyed"}

    def update(self, **changes: Any) -> VM:
        """Rename (``name=``) or resize while stopped (``ram=``, ``cpu=``)."""
        self._data = self._lab.request("PATCH", f"vms/{self.id}", changes)
        return self

    def clone(self, name: str, wait: bool = False, timeout: float = 300) -> VM:
        """A new VM called ``name`` with a copy of this stopped VM's disk (snapshots are
        not copied); it is pending while the disk is copied, then stopped: ``wait=True``
        waits for that. Quotas and credits apply as for a create."""
        clone = VM(self._lab, self._lab.request("POST", f"vms/{self.id}/clone", {"name": name}))
        return clone.wait("stopped", timeout) if wait else clone

    @property
    def ready(self) -> bool:
        """Whether the guest has booted (its image's console banner came, e.g. cloud-init
        finished); as last read, see :meth:`refresh`. Always False unless running."""
        return bool(self._data.get("ready", False)) and self._data.get("status") == "running"

    def _no_ready_field(self) -> bool:
        # A service older than "ready": running is all it can tell.
        return "ready" not in self._data and self._data.get("status") == "running"

    def wait(self, status: str = "running", timeout: float = 120, progress: bool = True) -> VM:
        """Wait until the VM has ``status``, or for ``"ready"`` until it runs and its guest
        has booted (:attr:`ready`); raises TimeoutError, or TwargaAPIError if it goes to
        ``error``. Shows a progress bar in a notebook."""
        bar = _Progress(f"{self.name}: waiting for {status}", timeout) if progress else None
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.refresh()
                if bar:
                    shown = self.status
                    if status == "ready" and self.status == "running":
                        shown = "ready" if self.ready else "booting"
                    bar.update(shown, time.monotonic() - (deadline - timeout))
                if status == "ready" and (self.ready or self._no_ready_field()):
                    return self
                if self.status == status:
                    return self
                if self.status == "error" and status != "error":
                    raise TwargaAPIError(
                        500, f"VM {self.name} failed: {self.status_message}", "vm_error"
                    )
                if time.monotonic() > deadline:
                    now = self.status
                    if status == "ready" and now == "running":
                        now = "running but not ready (its guest is still booting)"
                    raise TimeoutError(f"VM {self.name} is {now}, not {status}")
                time.sleep(0.5)
        finally:
            if bar:
                bar.close("ready" if status == "ready" and self.ready else self.status)

    async def wait_async(self, status: str = "running", timeout: float = 120) -> VM:
        """:meth:`wait` without blocking the kernel's event loop."""
        return await asyncio.to_thread(self.wait, status, timeout, False)

    def metrics(self) -> dict[str, Any]:
        """The VM's current metrics."""
        return self._lab.request("GET", f"metrics/vm/{self.id}")

    def credentials(self) -> dict[str, Any]:
        """How to log in over SSH (owner only)."""
        return self._lab.request("GET", f"vms/{self.id}/credentials")

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot_path(self, name: str) -> str:
        return f"vms/{self.id}/snapshots/{quote(name, safe='')}"

    def snapshot(self, name: str) -> dict[str, Any]:
        """Take snapshot ``name`` of the disk (and of the memory if the VM runs)."""
        return self._lab.request("POST", f"vms/{self.id}/snapshots", {"name": name})

    def snapshots(self) -> Any:
        """The VM's snapshots (name, created_at, state) as a DataFrame, oldest first."""
        import pandas as pd

        rows = self._lab.request("GET", f"vms/{self.id}/snapshots")
        frame = pd.DataFrame(rows, columns=["name", "created_at", "state"])
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
        return frame

    def revert(self, name: str) -> VM:
        """Go back to snapshot ``name``: running where it was if it ran when taken."""
        self._data = self._lab.request("POST", self._snapshot_path(name), {"action": "revert"})
        return self

    def delete_snapshot(self, name: str) -> None:
        """Delete snapshot ``name``."""
        self._lab.request("DELETE", self._snapshot_path(name))

    # -- console ----------------------------------------------------------------------------

    def _connect(self, timeout: float) -> Any:
        import websocket  # websocket-client

        ws = websocket.create_connection(
            self._lab.ws_url(f"vms/{self.id}/console"),
            header=[f"Authorization: token {self._lab.token}"],
            timeout=timeout,
        )
        return ws

    def run(self, command: str, timeout: float = 30) -> str:
        """Run one shell command on the VM's serial console and return its output."""
        line, start, end = framed_command(command, secrets.token_hex(4))
        ws = self._connect(timeout)
        deadline = time.monotonic() + timeout
        try:
            _read_until(ws, ATTACHED_TEXT, deadline)
            _wait_for_prompt(ws, deadline)
            ws.send(json.dumps(["stdin", line]))
            output = _read_until(ws, rf"{end}\r?\n", deadline)
        finally:
            ws.close()
        return framed_output(output, start, end)

    async def run_async(self, command: str, timeout: float = 30) -> str:
        """:meth:`run` without blocking the kernel's event loop."""
        return await asyncio.to_thread(self.run, command, timeout)

    def console(self) -> Any:
        """An interactive terminal on the VM's console, as a notebook widget."""
        from twarga_lab.widgets.console import ConsoleWidget

        return ConsoleWidget(self)


def _wait_for_prompt(ws: Any, deadline: float) -> None:
    """Press Enter until the guest's shell shows a prompt (it may still be booting)."""
    import websocket

    while True:
        ws.send(json.dumps(["stdin", "\r"]))
        seen = ""
        pause = min(time.monotonic() + 2.0, deadline)
        while time.monotonic() < pause:
            ws.settimeout(max(0.05, pause - time.monotonic()))
            try:
                message = ws.recv()
            except websocket.WebSocketTimeoutException:
                break
            kind, *payload = json.loads(message)
            if kind == "stdout":
                seen += payload[0]
            if PROMPT_RE.search(ANSI_RE.sub("", seen).replace("\r", "")):
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no shell prompt on the console: {seen[-300:]!r}")


def _read_until(ws: Any, pattern: str, deadline: float) -> str:
    seen = ""
    while not re.search(pattern, ANSI_RE.sub("", seen)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the console did not answer in time: {seen[-300:]!r}")
        ws.settimeout(remaining)
        message = ws.recv()
        if not message:
            raise ServiceUnavailable(503, "the console closed", "console_closed")
        kind, *payload = json.loads(message)
        if kind == "stdout":
            seen += payload[0]
        elif kind == "disconnect":
            raise ServiceUnavailable(503, "the console closed", "console_closed")
    return seen


class _Progress:
    """A progress bar: an ipywidget in a notebook, nothing elsewhere."""

    def __init__(self, label: str, total: float) -> None:
        self.widget = None
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is None or not hasattr(get_ipython(), "kernel"):
                return
            import ipywidgets as w

            self.widget = w.FloatProgress(value=0, min=0, max=total, description=label[:40])
            display(self.widget)
        except ImportError:
            self.widget = None

    def update(self, status: str, elapsed: float) -> None:
        if self.widget is not None:
            self.widget.value = min(elapsed, self.widget.max)
            self.widget.description = status

    def close(self, status: str) -> None:
        if self.widget is not None:
            self.widget.value = self.widget.max
            self.widget.bar_style = "success" if status in ("running", "ready") else "info"
            self.widget.description = status


class VMs:
    """My VMs: ``create``, ``list``, ``lab.vms["name"]`` or ``lab.vms[id]``, iteration."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab

    def create(
        self,
        name: str,
        image: str | None = None,
        ram: int | None = None,
        cpu: int | None = None,
        disk: int | None = None,
        wait: bool = False,
        timeout: float = 120,
    ) -> VM:
        """Create a VM (it starts by itself); ``wait=True`` waits until it runs."""
        body = {"name": name, "image": image, "ram": ram, "cpu": cpu, "disk": disk}
        vm = VM(
            self._lab,
            self._lab.request("POST", "vms", {k: v for k, v in body.items() if v is not None}),
        )
        return vm.wait("running", timeout) if wait else vm

    def list(self, all_users: bool = False) -> list[VM]:
        """My VMs (admins: everyone's with ``all_users=True``)."""
        params = {"all": "1"} if all_users else None
        return [VM(self._lab, data) for data in self._lab.request("GET", "vms", params=params)]

    def dataframe(self, all_users: bool = False) -> Any:
        """My VMs as a pandas DataFrame."""
        import pandas as pd

        rows = [vm.to_dict() for vm in self.list(all_users)]
        columns = [
            "id",
            "name",
            "status",
            "image",
            "ram",
            "cpu",
            "disk",
            "ip_address",
            "ssh_port",
            "uptime",
            "created_at",
            "owner",
        ]
        return pd.DataFrame(rows, columns=columns)

    def __getitem__(self, key: int | str) -> VM:
        if isinstance(key, int):
            return VM(self._lab, self._lab.request("GET", f"vms/{key}"))
        for vm in self.list():
            if vm.name == key:
                return vm
        raise VMNotFound(404, f"you have no VM named {key!r}", "no_vm")

    def __iter__(self) -> Iterator[VM]:
        return iter(self.list())

    def __len__(self) -> int:
        return len(self.list())


class Metrics:
    """Host and VM metrics, and their history as DataFrames."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab

    def host(self) -> dict[str, Any]:
        """Host CPU, memory, disk and network now."""
        return self._lab.request("GET", "metrics/host")

    def vm(self, vm: VM | int) -> dict[str, Any]:
        """A VM's metrics now."""
        return self._lab.request("GET", f"metrics/vm/{getattr(vm, 'id', vm)}")

    def history(
        self,
        metric: str,
        vm: VM | int | None = None,
        since: str | datetime | timedelta | None = "-1h",
        until: str | datetime | None = None,
        step: float | None = None,
    ) -> Any:
        """A metric's history (host, or a VM) as a DataFrame with ``time`` and ``value``."""
        import pandas as pd

        params = {
            "entity": "vm" if vm is not None else "host",
            "id": getattr(vm, "id", vm),
            "metric": metric,
            "since": _since(since),
            "until": _since(until),
            "step": step,
        }
        data = self._lab.request("GET", "metrics/history", params=params)
        frame = pd.DataFrame(data.get("points", []), columns=["time", "value"])
        frame["time"] = pd.to_datetime(frame["time"], utc=True, format="ISO8601")
        frame.attrs.update({k: v for k, v in data.items() if k != "points"})
        return frame


class SOC:
    """The security-event log."""

    COLUMNS = [
        "id",
        "created_at",
        "type",
        "severity",
        "message",
        "user_name",
        "vm_id",
        "source",
        "details",
    ]

    def __init__(self, lab: Lab) -> None:
        self._lab = lab

    def events(
        self,
        limit: int = 100,
        severity: str | None = None,
        type: str | None = None,
        vm: VM | int | None = None,
        since_id: int | None = None,
    ) -> Any:
        """Events I may see (admins: all) as a DataFrame, newest first."""
        import pandas as pd

        params = {
            "limit": limit,
            "severity": severity,
            "type": type,
            "vm_id": getattr(vm, "id", vm),
            "since_id": since_id,
        }
        data = self._lab.request("GET", "soc/events", params=params)
        rows = data["events"] if isinstance(data, dict) else data
        frame = pd.DataFrame(rows, columns=self.COLUMNS)
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
        return frame

    def statistics(self) -> dict[str, Any]:
        """Totals by severity and type, and counts per hour (admins)."""
        return self._lab.request("GET", "soc/statistics")


class Admin:
    """What admins do: users, credits, quotas, every VM."""

    def __init__(self, lab: Lab) -> None:
        self._lab = lab

    def users(self) -> Any:
        """Every user with credits, VM count, quota and whether active, as a DataFrame."""
        import pandas as pd

        rows = self._lab.request("GET", "admin/users")
        return pd.DataFrame(
            rows, columns=["name", "credits", "vm_count", "active", "quota", "usage", "created_at"]
        )

    def grant(self, user: str, amount: float, reason: str) -> float:
        """Give (or, negative, take) credits; returns the new balance."""
        path = f"admin/users/{quote(user, safe='')}/credits"
        return self._lab.request("POST", path, {"amount": amount, "reason": reason})["new_balance"]

    def ledger(self, user: str) -> Any:
        """A user's credit ledger as a DataFrame."""
        import pandas as pd

        rows = self._lab.request("GET", f"admin/users/{quote(user, safe='')}/credits")
        return pd.DataFrame(
            rows, columns=["id", "created_at", "amount", "balance_after", "reason", "actor"]
        )

    def set_quota(self, user: str, **limits: int | None) -> dict[str, Any]:
        """Set ``max_vms``, ``max_ram_mb``, ``max_cpu``, ``max_disk_gb`` (None: default)."""
        return self._lab.request("PATCH", f"admin/users/{quote(user, safe='')}/quota", limits)

    def vms(self) -> list[VM]:
        """Every user's VMs."""
        return self._lab.vms.list(all_users=True)

    HOST_COLUMNS = [
        "name", "state", "draining", "vms", "vcpus", "vcpus_used", "memory_mb",
        "ram_used_mb", "ram_free_mb", "disk_free_gb", "storage", "domain_type", "uri",
    ]  # fmt: skip

    def hosts(self) -> Any:
        """The hypervisor hosts (state, capacity, what their VMs use) as a DataFrame."""
        import pandas as pd

        return pd.DataFrame(self._lab.request("GET", "hosts"), columns=self.HOST_COLUMNS)

    def drain(self, host: str, draining: bool = True) -> dict[str, Any]:
        """Drain a host (it keeps its VMs, takes no new ones), or take it back (False)."""
        return self._lab.request(
            "PATCH", f"hosts/{quote(host, safe='')}", {"draining": bool(draining)}
        )


# -- labs ----------------------------------------------------------------------------------

#: The columns of :meth:`LabInstance.check`, one row per check.
CHECK_COLUMNS = ["check", "machine", "passed", "points", "score", "exit_code", "output"]
#: The columns of :meth:`Deployment.grades`, one row per student.
GRADE_COLUMNS = ["student", "lab_id", "score", "max_score", "grade"]


def _template_body(template: Any) -> str | dict[str, Any]:
    """A template's name, or its dict (from a dict, or an object with ``to_dict()``)."""
    if isinstance(template, str):
        return template
    if hasattr(template, "to_dict"):
        return template.to_dict()
    return dict(template)


def _check_frame(results: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Any:
    """One row per check result, with the :data:`CHECK_COLUMNS` (and ``error`` if any)."""
    import pandas as pd

    extra = extra or {}
    columns = [*extra, *CHECK_COLUMNS, "error"]
    rows = [{**extra, **{c: r.get(c) for c in columns if c not in extra}} for r in results]
    frame = pd.DataFrame(rows, columns=columns)
    frame["passed"] = frame["passed"].astype(bool)
    for column in ("points", "score"):
        frame[column] = pd.to_numeric(frame[column]).astype(float)
    return frame


def _grade(score: float, max_score: float) -> float:
    """A score in percent of the maximum, one decimal (0 when nothing could be earned)."""
    return round(100.0 * score / max_score, 1) if max_score else 0.0


class LabInstance:
    """One lab: VMs of one owner made from a template, on private networks of their own.
    Attributes mirror its JSON (``id``, ``name``, ``owner``, ``template``, ``status``,
    ``networks``, ``deployment_id`` ...); :meth:`refresh` reads them again."""

    def __init__(self, lab: Lab, data: dict[str, Any]) -> None:
        self._lab = lab
        self._data = data

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return (
            f"LabInstance(id={self.id}, name={self.name!r}, owner={self._data.get('owner')!r}, "
            f"status={self.status!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The lab's JSON as last read."""
        return dict(self._data)

    def refresh(self) -> LabInstance:
        """Read the lab again from the service."""
        self._data = self._lab.request("GET", f"labs/{self.id}")
        return self

    @property
    def vms(self) -> list[VM]:
        """The lab's VMs (as last read), each a :class:`VM` with ``machine`` and
        ``addresses`` (network name -> segment address)."""
        return [
            VM(self._lab, {**data, "machine": data.get("machine", data.get("lab_machine"))})
            for data in self._data.get("vms", [])
        ]

    def _act(self, action: str) -> LabInstance:
        answer = self._lab.request("POST", f"labs/{self.id}/action", {"action": action})
        if isinstance(answer, dict) and "status" in answer:
            self._data = answer
        elif action == "destroy":
            self._data = {**self._data, "status": "destroyed"}
        else:
            self.refresh()
        return self

    def start(self) -> LabInstance:
        """Start every VM of the lab."""
        return self._act("start")

    def stop(self) -> LabInstance:
        """Stop every VM of the lab."""
        return self._act("stop")

    def destroy(self) -> LabInstance:
        """Remove the lab: its VMs, their disks and its networks."""
        return self._act("destroy")

    def wait(self, status: str = "running", timeout: float = 300, poll: float = 0.5) -> LabInstance:
        """Wait until the lab has ``status`` (``running``: every VM runs); raises
        TimeoutError after ``timeout`` seconds, or TwargaAPIError if it goes to ``error``."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if self.status == status:
                return self
            if self.status == "error" and status != "error":
                failed = [
                    f"{vm.get('name')}: {vm.get('status_message') or vm.get('status')}"
                    for vm in self._data.get("vms", [])
                    if vm.get("status") == "error"
                ]
                raise TwargaAPIError(
                    500, f"lab {self.name} failed ({'; '.join(failed)})", "lab_error"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"lab {self.name} is {self.status}, not {status}")
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))

    def check(self) -> Any:
        """Run the template's checks in the lab's VMs: a DataFrame, one row per check, with
        ``check, machine, passed, points, score, exit_code, output`` (and ``error``); its
        ``attrs`` hold the lab's ``score`` and ``max_score``."""
        answer = self._lab.request("POST", f"labs/{self.id}/check")
        frame = _check_frame(answer.get("results", []))
        frame.attrs.update(
            lab_id=answer.get("lab_id", self.id),
            score=float(answer.get("score", frame["score"].sum())),
            max_score=float(answer.get("max_score", frame["points"].sum())),
        )
        return frame


class Deployment:
    """A template handed to every member of a Hub group: each student owns a lab of it.
    Attributes mirror its JSON (``id``, ``name``, ``template``, ``group`` ...); ``labs``
    are the students' copies (the teacher sees all of them)."""

    def __init__(self, lab: Lab, data: dict[str, Any]) -> None:
        self._lab = lab
        self._data = data
        self._grades: list[dict[str, Any]] | None = None

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["_data"][key]
        except KeyError:
            raise AttributeError(key) from None

    def __repr__(self) -> str:
        return (
            f"Deployment(id={self.id}, name={self.name!r}, group={self._data.get('group')!r}, "
            f"labs={len(self._data.get('labs', []))})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The deployment's JSON as last read."""
        return dict(self._data)

    def refresh(self) -> Deployment:
        """Read the deployment (and its labs) again."""
        self._data = self._lab.request("GET", f"deployments/{self.id}")
        return self

    @property
    def labs(self) -> list[LabInstance]:
        """Every student's lab of this deployment (as last read)."""
        return [LabInstance(self._lab, data) for data in self._data.get("labs", [])]

    def wait(self, status: str = "running", timeout: float = 600, poll: float = 1.0) -> Deployment:
        """Wait until every student's lab has ``status``; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            labs = self._data.get("labs", [])
            if labs and all(lab.get("status") == status for lab in labs):
                return self
            if time.monotonic() > deadline:
                states = {lab.get("owner"): lab.get("status") for lab in labs}
                raise TimeoutError(f"deployment {self.name}: not all {status}: {states}")
            time.sleep(max(0.0, min(poll, deadline - time.monotonic())))

    def check(self) -> Any:
        """Run the checks in every student's lab: a DataFrame, one row per (student, check)
        with ``student, lab_id`` and the columns of :meth:`LabInstance.check`. Keeps each
        student's total for :meth:`grades`."""
        import pandas as pd

        answer = self._lab.request("POST", f"deployments/{self.id}/check")
        students = _student_entries(answer)
        frames, grades = [], []
        for entry in students:
            results = entry.get("results") or []
            score = float(entry.get("score", sum(r.get("score") or 0 for r in results)))
            max_score = float(entry.get("max_score", sum(r.get("points") or 0 for r in results)))
            student = entry.get("owner") or entry.get("student")
            lab_id = entry.get("lab_id", entry.get("id"))
            grades.append(
                {
                    "student": student,
                    "lab_id": lab_id,
                    "score": score,
                    "max_score": max_score,
                    "grade": _grade(score, max_score),
                }
            )
            if results:
                frames.append(_check_frame(results, {"student": student, "lab_id": lab_id}))
        self._grades = grades
        if frames:
            return pd.concat(frames, ignore_index=True)
        return _check_frame([], {"student": None, "lab_id": None})

    def grades(self) -> Any:
        """One row per student: ``student, lab_id, score, max_score, grade`` (percent of the
        maximum), from the last :meth:`check` (run now if there was none), by student."""
        import pandas as pd

        if self._grades is None:
            self.check()
        frame = pd.DataFrame(self._grades, columns=GRADE_COLUMNS)
        return frame.sort_values("student", ignore_index=True)


def _student_entries(answer: Any) -> list[dict[str, Any]]:
    """The per-student entries of ``POST /deployments/{id}/check``: its ``labs``, each
    ``lab_id, lab, owner, results, score, max_score``."""
    if isinstance(answer, list):
        return answer
    return list(answer.get("labs") or [])
