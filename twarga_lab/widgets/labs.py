"""``LabsSection``: my labs in the ``VMDashboard``: each lab with its template, status,
networks (with their cidr) and VMs (machine, status, segment addresses, SSH, idle stop);
start / stop / destroy of the chosen lab (destroy after a second click), and a small form
that makes a lab from a template. Built on the notebook client only (``Lab.labs()``,
``LabInstance``, ``Lab.lab_templates()``, ``Lab.create_lab()``)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

import ipywidgets as widgets
from traitlets import Instance, Int, List, Unicode, observe

from twarga_lab.client import Lab, LabInstance, NotFound, TwargaAPIError
from twarga_lab.widgets.base import dispatch
from twarga_lab.widgets.data import STATUS_COLORS, badge, html_table
from twarga_lab.widgets.data import note as _note

LAB_VM_COLUMNS = ("Name", "Machine", "Status", "Addresses", "SSH", "Idle stop")
LAB_STATUS_COLORS = {**STATUS_COLORS, "partial": "#ff7f0e", "destroyed": "#7f7f7f"}
LAB_ACTIONS = {
    "start": ("Start lab", "success", "play", ("stopped", "partial", "error")),
    "stop": ("Stop lab", "", "stop", ("running", "partial", "pending")),
}
DESTROYABLE = ("pending", "running", "stopped", "partial", "error")
LAB_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")


# -- what the section shows (plain functions of the labs' JSON) ------------------------------


def idle_stop_label(vm: Mapping[str, Any]) -> str:
    """``stops when idle at 14:05`` (the kernel's local time) for a running VM the idle stop
    has a time for; ``''`` otherwise."""
    at = vm.get("idle_stop_at")
    if vm.get("status") != "running" or not at:
        return ""
    try:
        when = datetime.fromisoformat(str(at).replace("Z", "+00:00"))
    except ValueError:
        return ""
    if when.tzinfo is not None:
        when = when.astimezone()
    return f"stops when idle at {when:%H:%M}"


def addresses_label(vm: Mapping[str, Any]) -> str:
    """``lan 10.77.0.11 · dmz 10.78.0.5``: a lab VM's segment addresses."""
    return " · ".join(
        f"{network} {address}"
        for network, address in (vm.get("addresses") or {}).items()
        if address
    )


def networks_label(lab: Mapping[str, Any]) -> str:
    """``lan 10.77.0.0/24 · dmz 10.78.0.0/24``: a lab's private networks."""
    return " · ".join(f"{n['name']} {n['cidr']}" for n in lab.get("networks") or [])


def lab_vm_rows(
    lab: Mapping[str, Any], vms: Iterable[Mapping[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Table rows of a lab's VMs, in the lab's order; each VM's entry of ``vms`` (the VM
    list) completes what the lab JSON says of it."""
    full = {vm["id"]: vm for vm in vms if vm.get("id") is not None}
    rows = []
    for member in lab.get("vms") or []:
        # What the VM list knows wins, unless it is missing there.
        extra = {k: v for k, v in full.get(member["id"], {}).items() if v is not None}
        vm = {**member, **extra}
        vm["addresses"] = vm.get("addresses") or member.get("addresses") or {}
        status = vm.get("status") or "?"
        rows.append(
            {
                "Name": vm.get("name"),
                # The service names it "lab_machine" in the VM JSON.
                "Machine": vm.get("machine") or vm.get("lab_machine") or "",
                "Status": badge(status, STATUS_COLORS.get(status, "#333")),
                "Addresses": addresses_label(vm) or "—",
                "SSH": f"127.0.0.1:{vm['ssh_port']}" if vm.get("ssh_port") else "—",
                "Idle stop": idle_stop_label(vm),
            }
        )
    return rows


def lab_html(lab: Mapping[str, Any], vms: Iterable[Mapping[str, Any]] = ()) -> str:
    """One lab as HTML: a header (name, status, template, networks) over its VMs' table."""
    status = lab.get("status") or "?"
    status_badge = badge(status, LAB_STATUS_COLORS.get(status, "#333"))
    networks = networks_label(lab)
    head = (
        f"<div class='twarga-lab-head'><b>{html.escape(str(lab.get('name')))}</b> "
        f"{status_badge} <span style='color:#555'>template "
        f"{html.escape(str(lab.get('template')))}"
        + (f" · networks <code>{html.escape(networks)}</code>" if networks else "")
        + "</span></div>"
    )
    table = html_table(LAB_VM_COLUMNS, lab_vm_rows(lab, vms), empty="This lab has no VMs.")
    return (
        f"<div class='twarga-lab' data-lab='{html.escape(str(lab.get('name')))}' "
        "style='margin:6px 0;padding:4px 8px;border-left:3px solid #1976d2'>"
        f"{head}{table}</div>"
    )


def labs_html(labs: Iterable[Mapping[str, Any]], vms: Iterable[Mapping[str, Any]] = ()) -> str:
    """Every lab (destroyed ones left out) as :func:`lab_html`, or a line saying there are
    none."""
    vms = list(vms)
    shown = [lab for lab in labs if lab.get("status") != "destroyed"]
    if not shown:
        return "<p class='twarga-empty'><i>No labs yet: make one from a template below.</i></p>"
    return "".join(lab_html(lab, vms) for lab in shown)


def lab_options(labs: Iterable[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """Dropdown options ``("mine (running)", id)`` of the labs that still exist."""
    return [
        (f"{lab['name']} ({lab.get('status')})", lab["id"])
        for lab in labs
        if lab.get("status") != "destroyed"
    ]


def lab_vm_ids(labs: Iterable[Mapping[str, Any]]) -> set[int]:
    """The ids of the labs' VMs (the dashboard's VM table leaves them to this section)."""
    return {vm["id"] for lab in labs for vm in lab.get("vms") or [] if "id" in vm}


def load_labs(lab: Lab) -> tuple[list[dict[str, Any]] | None, str]:
    """My labs as JSON dicts and ``''``; ``(None, why)`` when they cannot be listed, and
    ``(None, '')`` from a service without labs (it answers 404). The VMs show either way."""
    try:
        return [item.to_dict() for item in lab.labs()], ""
    except NotFound:
        return None, ""
    except TwargaAPIError as error:
        return None, error.message


def load_templates(lab: Lab) -> list[dict[str, Any]] | None:
    """The lab templates, or None when they cannot be listed (asked again next time)."""
    try:
        return lab.lab_templates()
    except TwargaAPIError:
        return None


# -- the section ---------------------------------------------------------------------------


class LabsSection(widgets.VBox):
    """My labs with their VMs and networks; Start lab / Stop lab / Destroy lab on the lab
    chosen in ``picker`` (destroy takes a second click on "Confirm destroy"); a template,
    a name and "Create lab". ``labs`` (lab JSON dicts) and ``vms`` (the VM list) are the
    input; ``after`` runs after each action."""

    lab = Instance(Lab)
    labs = List(help="My labs, as ``LabInstance.to_dict()`` shapes.")
    vms = List(help="My VMs (``VM.to_dict()``): they complete the labs' VM entries.")
    templates = List(help="The lab templates (``Lab.lab_templates()``).")
    list_error = Unicode("", help="Why the labs could not be listed ('' when they were).")
    selected = Int(None, allow_none=True, help="The chosen lab's id.")
    armed = Int(None, allow_none=True, help="The lab a destroy awaits confirmation for.")

    def __init__(self, lab: Lab, after: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lab = lab
        self._after = after
        self.heading = widgets.HTML("<b>My labs</b>")
        self.view = widgets.HTML("")
        self.picker = widgets.Dropdown(description="Lab", options=[], value=None)
        self.buttons: dict[str, widgets.Button] = {}
        for action, (label, style, icon, _) in LAB_ACTIONS.items():
            button = widgets.Button(description=label, button_style=style, icon=icon)
            button.on_click(lambda _, a=action: self.act(a))
            self.buttons[action] = button
        self.destroy_button = widgets.Button(
            description="Destroy lab", button_style="danger", icon="trash"
        )
        self.destroy_button.on_click(lambda _: self.arm())
        self.confirm_button = widgets.Button(
            description="Confirm destroy",
            button_style="danger",
            disabled=True,
            layout=widgets.Layout(display="none"),
        )
        self.confirm_button.on_click(lambda _: self.confirm())
        self.result = widgets.HTML("")
        self.template = widgets.Dropdown(description="Template", options=[], value=None)
        self.name = widgets.Text(description="Lab name", placeholder="my-lab")
        self.create_button = widgets.Button(
            description="Create lab", button_style="primary", icon="plus"
        )
        self.create_button.on_click(lambda _: self.create())
        self.form_result = widgets.HTML("")
        widgets.link((self.picker, "value"), (self, "selected"))
        self.children = [
            self.heading,
            self.view,
            widgets.HBox(
                [self.picker, *self.buttons.values(), self.destroy_button, self.confirm_button]
            ),
            self.result,
            widgets.HBox([self.template, self.name, self.create_button]),
            self.form_result,
        ]
        self._render()

    # -- input -----------------------------------------------------------------------------

    def apply(
        self,
        labs: list[dict[str, Any]] | None,
        vms: list[dict[str, Any]],
        error: str = "",
        templates: list[dict[str, Any]] | None = None,
    ) -> None:
        """New data from a refresh: the labs (None: they could not be listed, ``error``
        says why), the VM list and, when listed, the templates."""
        with self.hold_trait_notifications():
            self.list_error = error if labs is None else ""
            if labs is not None:
                self.labs = [lab for lab in labs if lab.get("status") != "destroyed"]
            self.vms = vms
            if templates is not None:
                self.templates = templates

    def _lab(self, lab_id: int | None) -> dict[str, Any] | None:
        return next((lab for lab in self.labs if lab["id"] == lab_id), None)

    @observe("labs", "vms", "list_error")
    def _data_changed(self, _: Any) -> None:
        self._render()

    def _render(self) -> None:
        if self.list_error:
            self.view.value = _note(
                f"The labs cannot be listed: {html.escape(self.list_error)}", "#b71c1c"
            )
        else:
            self.view.value = labs_html(self.labs, self.vms)
        with self.picker.hold_sync():
            current = self.picker.value
            options = lab_options(self.labs)
            self.picker.options = options
            ids = [lab_id for _, lab_id in options]
            self.picker.value = current if current in ids else (ids[0] if ids else None)
        if self.armed is not None and self._lab(self.armed) is None:
            self.armed = None
        self._sync_enabled()

    @observe("templates")
    def _templates_changed(self, _: Any) -> None:
        names = [t["name"] for t in self.templates]
        with self.template.hold_sync():
            current = self.template.value
            self.template.options = [
                (f"{t['name']} — {t['title']}" if t.get("title") else t["name"], t["name"])
                for t in self.templates
            ]
            self.template.value = current if current in names else (names[0] if names else None)

    @observe("selected")
    def _selected_changed(self, _: Any) -> None:
        self.armed = None
        self._sync_enabled()

    @observe("armed")
    def _armed_changed(self, change: dict[str, Any]) -> None:
        lab = self._lab(change["new"])
        with self.confirm_button.hold_sync():
            self.confirm_button.disabled = lab is None
            self.confirm_button.layout.display = "none" if lab is None else ""
            self.confirm_button.description = (
                f"Confirm destroy {lab['name']}" if lab else "Confirm destroy"
            )

    def _sync_enabled(self) -> None:
        lab = self._lab(self.selected)
        status = lab.get("status") if lab else None
        for action, (_, _, _, enabled) in LAB_ACTIONS.items():
            self.buttons[action].disabled = status not in enabled
        self.destroy_button.disabled = status not in DESTROYABLE

    # -- actions ---------------------------------------------------------------------------

    def act(self, action: str) -> None:
        """Start or stop every VM of the chosen lab."""
        lab = self._lab(self.selected)
        if lab is None or action not in LAB_ACTIONS:
            return
        self.armed = None
        self.result.value = _note(f"lab {html.escape(lab['name'])}: {action}…", "#555")
        instance = LabInstance(self.lab, lab)
        dispatch(
            lambda: getattr(instance, action)().to_dict(),
            lambda data: self._done(f"lab {data['name']} is {data['status']}"),
            self._fail,
        )

    def arm(self) -> None:
        """First click on Destroy lab: ask for a confirmation."""
        lab = self._lab(self.selected)
        if lab is None:
            return
        self.armed = lab["id"]
        count = len(lab.get("vms") or [])
        self.result.value = _note(
            f"Destroy lab <b>{html.escape(lab['name'])}</b>: its "
            f"{'VM' if count == 1 else f'{count} VMs'}, their disks and its networks? "
            "Click “Confirm destroy” to go on.",
            "#b71c1c",
        )

    def confirm(self) -> None:
        """Second click: destroy the lab the confirmation was asked for."""
        lab = self._lab(self.armed)
        self.armed = None
        if lab is None:
            return
        self.result.value = _note(f"destroying lab {html.escape(lab['name'])}…", "#555")
        instance = LabInstance(self.lab, lab)
        dispatch(
            lambda: instance.destroy().to_dict(),
            lambda _: self._done(f"lab {lab['name']} destroyed"),
            self._fail,
        )

    def create(self) -> None:
        """Make a lab from the chosen template; the service's refusal shows under the form."""
        template, name = self.template.value, self.name.value.strip()
        if not template:
            self.form_result.value = _note("⚠ Choose a template first.", "#b71c1c")
            return
        if not LAB_NAME.match(name):
            self.form_result.value = _note(
                "⚠ A lab name is lower-case letters, digits and dashes, starting with a "
                "letter (e.g. my-lab).",
                "#b71c1c",
            )
            return
        self.form_result.value = _note(f"creating lab {html.escape(name)}…", "#555")
        self.create_button.disabled = True
        dispatch(
            lambda: self.lab.create_lab(template, name).to_dict(),
            self._created,
            self._refused,
        )

    def _created(self, lab: dict[str, Any]) -> None:
        self.create_button.disabled = False
        self.name.value = ""
        self.labs = [*(x for x in self.labs if x["id"] != lab["id"]), lab]
        self.form_result.value = _note(
            f"lab {html.escape(lab['name'])} is {html.escape(str(lab.get('status')))}: "
            "its VMs start by themselves.",
            "#1b5e20",
        )
        if self._after is not None:
            self._after()

    def _refused(self, error: TwargaAPIError) -> None:
        self.create_button.disabled = False
        self.form_result.value = _note(f"⚠ {html.escape(error.message)}", "#b71c1c")

    def _done(self, text: str) -> None:
        self.result.value = _note(html.escape(text), "#1b5e20")
        if self._after is not None:
            self._after()

    def _fail(self, error: TwargaAPIError) -> None:
        self.result.value = _note(f"⚠ {html.escape(error.message)}", "#b71c1c")


__all__ = [
    "LAB_VM_COLUMNS",
    "LabsSection",
    "addresses_label",
    "idle_stop_label",
    "lab_html",
    "lab_vm_ids",
    "lab_vm_rows",
    "labs_html",
    "load_labs",
    "load_templates",
    "networks_label",
]
