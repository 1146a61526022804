"""``VMDashboard``: my VMs with their actions and snapshots, my labs (their VMs and
networks, lab actions, a lab from a template), a create form, my credits and quota."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import bqplot as bq
import ipywidgets as widgets
from traitlets import Bool, Instance, Int, List, observe

from twarga_lab.client import VM, Lab, TwargaAPIError
from twarga_lab.widgets.base import LivePanel, dispatch
from twarga_lab.widgets.data import (
    VM_COLUMNS,
    account_summary,
    error_field,
    html_table,
    quota_use,
    vm_options,
    vm_rows,
)
from twarga_lab.widgets.data import (
    note as _note,
)
from twarga_lab.widgets.labs import (
    LabsSection,
    idle_stop_label,
    lab_vm_ids,
    load_labs,
    load_templates,
)
from twarga_lab.widgets.snapshots import VMSnapshots, list_snapshots

CREATE_FIELDS = ("name", "image", "ram", "cpu", "disk")
ACTIONS = {
    "start": ("Start", "success", "play"),
    "stop": ("Stop", "", "stop"),
    "restart": ("Restart", "", "refresh"),
    "force-stop": ("Force stop", "warning", "power-off"),
}


class VMActionBar(widgets.VBox):
    """A VM picker with start / stop / restart / destroy; destroy takes a second click on
    "Confirm destroy". ``vms`` (VM dicts) is the input; ``after`` runs after each action."""

    lab = Instance(Lab)
    vms = List(help="The VMs to choose from, as ``VM.to_dict()`` shapes.")
    selected = Int(None, allow_none=True, help="The chosen VM's id.")
    show_owner = Bool(False, help="Label VMs with their owner (the admin's view).")
    armed = Int(None, allow_none=True, help="The VM a destroy awaits confirmation for.")

    def __init__(
        self,
        lab: Lab,
        after: Callable[[], None] | None = None,
        force_stop: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lab = lab
        self._after = after
        self.picker = widgets.Dropdown(description="VM", options=[], value=None)
        self.buttons: dict[str, widgets.Button] = {}
        for action, (label, style, icon) in ACTIONS.items():
            if action == "force-stop" and not force_stop:
                continue
            button = widgets.Button(description=label, button_style=style, icon=icon)
            button.on_click(lambda _, a=action: self.act(a))
            self.buttons[action] = button
        self.destroy_button = widgets.Button(
            description="Destroy", button_style="danger", icon="trash"
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
        widgets.link((self.picker, "value"), (self, "selected"))
        self.children = [
            widgets.HBox(
                [self.picker, *self.buttons.values(), self.destroy_button, self.confirm_button]
            ),
            self.result,
        ]
        self._sync_enabled()

    def _vm(self, vm_id: int | None) -> dict[str, Any] | None:
        return next((vm for vm in self.vms if vm["id"] == vm_id), None)

    @observe("vms", "show_owner")
    def _vms_changed(self, _: Any) -> None:
        with self.picker.hold_sync():
            current = self.picker.value
            options = vm_options(self.vms, owner=self.show_owner)
            self.picker.options = options
            ids = [vm_id for _, vm_id in options]
            self.picker.value = current if current in ids else (ids[0] if ids else None)
        if self.armed is not None and self._vm(self.armed) is None:
            self.armed = None
        self._sync_enabled()

    @observe("selected")
    def _selected_changed(self, _: Any) -> None:
        self.armed = None
        self._sync_enabled()

    @observe("armed")
    def _armed_changed(self, change: dict[str, Any]) -> None:
        vm = self._vm(change["new"])
        with self.confirm_button.hold_sync():
            self.confirm_button.disabled = vm is None
            self.confirm_button.layout.display = "none" if vm is None else ""
            self.confirm_button.description = (
                f"Confirm destroy {vm['name']}" if vm else "Confirm destroy"
            )

    def _sync_enabled(self) -> None:
        none = self.selected is None
        for button in [*self.buttons.values(), self.destroy_button]:
            button.disabled = none

    def act(self, action: str) -> None:
        """Start, stop, restart or force-stop the chosen VM."""
        vm = self._vm(self.selected)
        if vm is None:
            return
        self.armed = None
        self.result.value = _note(f"{html.escape(vm['name'])}: {action}…", "#555")
        dispatch(
            lambda: VM(self.lab, vm)._act(action).to_dict(),
            lambda data: self._done(f"{data['name']} is {data['status']}"),
            self._fail,
        )

    def arm(self) -> None:
        """First click on Destroy: ask for a confirmation."""
        vm = self._vm(self.selected)
        if vm is None:
            return
        self.armed = vm["id"]
        self.result.value = _note(
            f"Destroy <b>{html.escape(vm['name'])}</b> and its disk? "
            "Click “Confirm destroy” to go on.",
            "#b71c1c",
        )

    def confirm(self) -> None:
        """Second click: destroy the VM the confirmation was asked for."""
        vm = self._vm(self.armed)
        self.armed = None
        if vm is None:
            return
        self.result.value = _note(f"destroying {html.escape(vm['name'])}…", "#555")
        dispatch(
            lambda: VM(self.lab, vm).destroy(),
            lambda _: self._done(f"{vm['name']} destroyed"),
            self._fail,
        )

    def _done(self, text: str) -> None:
        self.result.value = _note(html.escape(text), "#1b5e20")
        if self._after is not None:
            self._after()

    def _fail(self, error: TwargaAPIError) -> None:
        self.result.value = _note(f"⚠ {html.escape(error.message)}", "#b71c1c")


class VMDashboard(LivePanel):
    """My VMs: status, IP, SSH port and uptime; start, stop, restart and destroy; the chosen
    VM's snapshots (take, revert, delete); my labs (``labs``, a :class:`LabsSection`): each
    with its networks and its VMs (segment addresses, idle stop), start / stop / destroy of a
    lab and a lab from a template; a create form whose errors show next to their field; my
    credits and quota use. VMs of a lab show under their lab, the table has the others.

        >>> dash = VMDashboard(lab)
        >>> dash.start()      # live refresh every `interval` seconds
        >>> dash
    """

    title = "My VMs"

    def __init__(self, lab: Lab | None = None, **kwargs: Any) -> None:
        super().__init__(lab, **kwargs)
        self.account = widgets.HTML("")
        x_scale, y_scale = bq.OrdinalScale(), bq.LinearScale(min=0, max=100)
        self.quota_bars = bq.Bars(
            x=[],
            y=[],
            scales={"x": x_scale, "y": y_scale},
            colors=["#1976d2"],
            labels=["quota used"],
        )
        self.quota_chart = bq.Figure(
            marks=[self.quota_bars],
            axes=[
                bq.Axis(scale=x_scale),
                bq.Axis(scale=y_scale, orientation="vertical", label="% of quota"),
            ],
            title="Quota use",
            layout=widgets.Layout(width="420px", height="240px"),
            fig_margin={"top": 40, "bottom": 30, "left": 50, "right": 10},
        )
        self.table = widgets.HTML("")
        self.actions = VMActionBar(self.lab, after=self.request_refresh)
        # Its results and refusals show in the action bar's status line, under the picker.
        self.snapshots = VMSnapshots(
            self.lab, result=self.actions.result, after=self.request_refresh
        )
        self.actions.observe(lambda _: self._select(), names=["selected", "vms"])
        # Hidden until the service lists labs (one from before them answers 404).
        self.labs = LabsSection(
            self.lab, after=self.request_refresh, layout=widgets.Layout(display="none")
        )
        self.fields: dict[str, widgets.DOMWidget] = {
            "name": widgets.Text(description="Name", placeholder="web-1"),
            "image": widgets.Dropdown(description="Image", options=[]),
            "ram": widgets.IntText(value=1024, description="RAM (MB)"),
            "cpu": widgets.IntText(value=1, description="vCPUs"),
            "disk": widgets.IntText(value=10, description="Disk (GB)"),
        }
        self.errors = {name: widgets.HTML("") for name in CREATE_FIELDS}
        self.create_button = widgets.Button(
            description="Create VM", button_style="primary", icon="plus"
        )
        self.create_button.on_click(lambda _: self.create())
        self.form_result = widgets.HTML("")
        form = widgets.VBox(
            [
                widgets.HTML("<b>New VM</b>"),
                *(widgets.HBox([self.fields[n], self.errors[n]]) for n in CREATE_FIELDS),
                widgets.HBox([self.create_button, self.form_result]),
            ]
        )
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.request_refresh())
        self.children = [
            widgets.HBox([self.heading, self.refresh_button]),
            self.message,
            self.account,
            self.table,
            self.labs,
            self.actions,
            self.snapshots,
            widgets.HBox([form, self.quota_chart]),
        ]

    @observe("lab")
    def _lab_changed(self, change: dict[str, Any]) -> None:
        if hasattr(self, "actions"):
            self.actions.lab = change["new"]
            self.snapshots.lab = change["new"]
            self.labs.lab = change["new"]

    def _select(self) -> None:
        """The snapshots follow the VM chosen in the action bar (and its status)."""
        self.snapshots.vm = self.actions._vm(self.actions.selected)

    def load(self) -> dict[str, Any]:
        vms = [vm.to_dict() for vm in self.lab.vms.list()]
        selected = self.snapshots.vm
        listed: tuple[int, list[dict[str, Any]] | None, str] | None = None
        if selected is not None and any(vm["id"] == selected["id"] for vm in vms):
            # A VM that cannot list its snapshots (still being created) is not an outage.
            try:
                listed = (selected["id"], list_snapshots(self.lab, selected), "")
            except TwargaAPIError as error:
                listed = (selected["id"], None, error.message)
        labs, labs_error = load_labs(self.lab)
        # The templates are asked for until they have been listed once.
        templates = (
            load_templates(self.lab) if labs is not None and not self.labs.templates else None
        )
        return {
            "me": self.lab.me(),
            "vms": vms,
            "images": self.lab.images(),
            "snapshots": listed,
            "labs": labs,
            "labs_error": labs_error,
            "lab_templates": templates,
        }

    def show(self, data: dict[str, Any]) -> None:
        self.account.value = account_summary(data["me"])
        labels, percents = quota_use(data["me"])
        with self.quota_bars.hold_sync():
            self.quota_bars.x, self.quota_bars.y = labels, percents
        labs, labs_error = data.get("labs"), data.get("labs_error", "")
        self.labs.apply(labs, data["vms"], labs_error, data.get("lab_templates"))
        self.labs.layout.display = "none" if labs is None and not labs_error else ""
        # VMs of a lab show under their lab; the table has the others.
        in_labs = lab_vm_ids(self.labs.labs) if labs is not None else set()
        plain = [vm for vm in data["vms"] if vm["id"] not in in_labs]
        rows = vm_rows(plain)
        columns: tuple[str, ...] = VM_COLUMNS
        idle = [idle_stop_label(vm) for vm in plain]
        if any(idle):
            columns = (*VM_COLUMNS, "Idle stop")
            for row, label in zip(rows, idle, strict=True):
                row["Idle stop"] = label
        empty = (
            "No VMs outside your labs: create one below."
            if in_labs
            else "No VMs yet: create one below."
        )
        self.table.value = html_table(columns, rows, empty=empty)
        self.actions.vms = data["vms"]
        if data.get("snapshots") is not None:
            self.snapshots.apply(*data["snapshots"])
        names = [image["name"] for image in data["images"]]
        image = self.fields["image"]
        if list(image.options) != names:
            with image.hold_sync():
                current = image.value
                image.options = names
                image.value = current if current in names else (names[0] if names else None)

    def create(self) -> None:
        """Create a VM from the form; errors show next to their field."""
        body = {name: field.value for name, field in self.fields.items()}
        body["name"] = body["name"].strip()
        for label in self.errors.values():
            label.value = ""
        self.form_result.value = _note(f"creating {html.escape(body['name'])}…", "#555")
        self.create_button.disabled = True
        dispatch(lambda: self.lab.vms.create(**body).to_dict(), self._created, self._refused)

    def _created(self, vm: dict[str, Any]) -> None:
        self.create_button.disabled = False
        self.form_result.value = _note(
            f"{html.escape(vm['name'])} is {vm['status']}: it starts by itself.", "#1b5e20"
        )
        self.fields["name"].value = ""
        self.request_refresh()

    def _refused(self, error: TwargaAPIError) -> None:
        self.create_button.disabled = False
        field = error_field(error, CREATE_FIELDS)
        text = _note(f"⚠ {html.escape(error.message)}", "#b71c1c")
        if field is None:
            self.form_result.value = text
        else:
            self.form_result.value = ""
            self.errors[field].value = text
