"""``AdminPanel``: users with credits, VM counts and quotas; credit grants with a reason;
quota edits; the hypervisor hosts, drained or taken back; every user's VMs with their
actions. Admins only."""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as widgets
from traitlets import observe

from twarga_lab.client import Lab, TwargaAPIError
from twarga_lab.widgets.base import LivePanel, dispatch
from twarga_lab.widgets.data import (
    HOST_COLUMNS,
    USER_COLUMNS,
    VM_COLUMNS,
    error_field,
    format_credits,
    host_rows,
    html_table,
    parse_optional_int,
    user_rows,
    vm_rows,
)
from twarga_lab.widgets.vms import VMActionBar

GRANT_FIELDS = ("user", "amount", "reason")
QUOTA_FIELDS = ("max_vms", "max_ram_mb", "max_cpu", "max_disk_gb")
QUOTA_LABELS = {
    "max_vms": "VMs",
    "max_ram_mb": "RAM (MB)",
    "max_cpu": "vCPUs",
    "max_disk_gb": "Disk (GB)",
}


def _ok(text: str) -> str:
    return f"<span style='color:#1b5e20'>{html.escape(text)}</span>"


def _bad(text: str) -> str:
    return f"<span style='color:#b71c1c'>⚠ {html.escape(text)}</span>"


class AdminPanel(LivePanel):
    """What admins manage: users, credits, quotas and every VM."""

    title = "Administration"

    def __init__(self, lab: Lab | None = None, **kwargs: Any) -> None:
        super().__init__(lab, **kwargs)
        self.users: list[dict[str, Any]] = []
        self.users_table = widgets.HTML("")
        # Credits
        self.grant_fields: dict[str, widgets.DOMWidget] = {
            "user": widgets.Dropdown(description="User", options=[]),
            "amount": widgets.FloatText(value=100.0, description="Amount"),
            "reason": widgets.Text(description="Reason", placeholder="course project"),
        }
        self.grant_errors = {name: widgets.HTML("") for name in GRANT_FIELDS}
        self.grant_button = widgets.Button(description="Grant credits", button_style="primary")
        self.grant_button.on_click(lambda _: self.grant())
        self.grant_result = widgets.HTML("")
        # Quotas: empty means the server's default
        self.quota_user = widgets.Dropdown(description="User", options=[])
        self.quota_fields = {
            name: widgets.Text(description=QUOTA_LABELS[name], placeholder="default")
            for name in QUOTA_FIELDS
        }
        self.quota_errors = {name: widgets.HTML("") for name in QUOTA_FIELDS}
        self.quota_button = widgets.Button(description="Save quota", button_style="primary")
        self.quota_button.on_click(lambda _: self.save_quota())
        self.quota_result = widgets.HTML("")
        self.quota_user.observe(lambda _: self._fill_quota(), "value")
        # Hypervisor hosts
        self.hosts_table = widgets.HTML("")
        self.host_picker = widgets.Dropdown(description="Host", options=[])
        self.drain_button = widgets.Button(description="Drain", icon="pause")
        self.drain_button.on_click(lambda _: self.set_draining(True))
        self.undrain_button = widgets.Button(description="Take back", icon="play")
        self.undrain_button.on_click(lambda _: self.set_draining(False))
        self.host_result = widgets.HTML("")
        # VMs
        self.vms_table = widgets.HTML("")
        self.actions = VMActionBar(self.lab, after=self.request_refresh, force_stop=True)
        self.actions.show_owner = True
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _: self.request_refresh())

        def rows(fields: dict[str, Any], errors: dict[str, Any]) -> list[widgets.HBox]:
            return [widgets.HBox([fields[n], errors[n]]) for n in fields]

        self.children = [
            widgets.HBox([self.heading, self.refresh_button]),
            self.message,
            widgets.HTML("<b>Users</b>"),
            self.users_table,
            widgets.HTML("<b>Grant or take credits</b> <small>(a negative amount takes)</small>"),
            *rows(self.grant_fields, self.grant_errors),
            widgets.HBox([self.grant_button, self.grant_result]),
            widgets.HTML("<b>Quota</b> <small>(empty: the default)</small>"),
            self.quota_user,
            *rows(self.quota_fields, self.quota_errors),
            widgets.HBox([self.quota_button, self.quota_result]),
            widgets.HTML(
                "<b>Hypervisor hosts</b> <small>(a drained host keeps its VMs and takes no "
                "new ones)</small>"
            ),
            self.hosts_table,
            widgets.HBox(
                [self.host_picker, self.drain_button, self.undrain_button, self.host_result]
            ),
            widgets.HTML("<b>Every VM</b>"),
            self.vms_table,
            self.actions,
        ]

    @observe("lab")
    def _lab_changed(self, change: dict[str, Any]) -> None:
        if hasattr(self, "actions"):
            self.actions.lab = change["new"]

    def load(self) -> dict[str, Any]:
        users = self.lab.admin.users().to_dict("records")
        vms = [vm.to_dict() for vm in self.lab.vms.list(all_users=True)]
        hosts = self.lab.admin.hosts().to_dict("records")
        return {"users": users, "vms": vms, "hosts": hosts}

    def show(self, data: dict[str, Any]) -> None:
        self.users = data["users"]
        self.users_table.value = html_table(USER_COLUMNS, user_rows(self.users), empty="No users.")
        names = [user["name"] for user in self.users]
        for picker in (self.grant_fields["user"], self.quota_user):
            if list(picker.options) != names:
                with picker.hold_sync():
                    current = picker.value
                    picker.options = names
                    picker.value = current if current in names else (names[0] if names else None)
        self.hosts_table.value = html_table(
            HOST_COLUMNS, host_rows(data["hosts"]), empty="No hosts."
        )
        host_names = [host["name"] for host in data["hosts"]]
        if list(self.host_picker.options) != host_names:
            with self.host_picker.hold_sync():
                current = self.host_picker.value
                self.host_picker.options = host_names
                self.host_picker.value = (
                    current if current in host_names else (host_names[0] if host_names else None)
                )
        owner_rows = vm_rows(data["vms"], owner=True)
        self.vms_table.value = html_table(
            ("Owner", "Host", *VM_COLUMNS), owner_rows, empty="No VMs."
        )
        self.actions.vms = data["vms"]

    def _user(self, name: str | None) -> dict[str, Any] | None:
        return next((u for u in self.users if u["name"] == name), None)

    def _fill_quota(self) -> None:
        user = self._user(self.quota_user.value)
        quota = (user or {}).get("quota") or {}
        for name, field in self.quota_fields.items():
            value = quota.get(name)
            field.value = "" if value is None else str(value)
            self.quota_errors[name].value = ""

    # -- credits ---------------------------------------------------------------------------

    def grant(self) -> None:
        """Grant (or take) credits to the chosen user, with the reason given."""
        user = self.grant_fields["user"].value
        amount = self.grant_fields["amount"].value
        reason = self.grant_fields["reason"].value
        for label in self.grant_errors.values():
            label.value = ""
        self.grant_result.value = ""
        if not user:
            self.grant_errors["user"].value = _bad("choose a user")
            return
        dispatch(
            lambda: self.lab.admin.grant(user, amount, reason),
            lambda balance: self._granted(user, balance),
            lambda error: self._refused(error, self.grant_errors, self.grant_result),
        )

    def _granted(self, user: str, balance: float) -> None:
        self.grant_result.value = _ok(f"{user} now has {format_credits(balance)} credits")
        self.grant_fields["reason"].value = ""
        self.request_refresh()

    # -- hosts -----------------------------------------------------------------------------

    def set_draining(self, draining: bool) -> None:
        """Drain the chosen host, or take it back."""
        host = self.host_picker.value
        self.host_result.value = ""
        if not host:
            self.host_result.value = _bad("choose a host")
            return
        dispatch(
            lambda: self.lab.admin.drain(host, draining),
            lambda answer: self._host_set(answer),
            lambda error: self._refused(error, {}, self.host_result),
        )

    def _host_set(self, host: dict[str, Any]) -> None:
        self.host_result.value = _ok(f"host {host['name']} is {host['state']}")
        self.request_refresh()

    # -- quotas ----------------------------------------------------------------------------

    def save_quota(self) -> None:
        """Set the chosen user's quota to the values in the form."""
        user = self.quota_user.value
        self.quota_result.value = ""
        limits: dict[str, int | None] = {}
        for name, field in self.quota_fields.items():
            try:
                limits[name] = parse_optional_int(field.value)
                self.quota_errors[name].value = ""
            except ValueError as error:
                self.quota_errors[name].value = _bad(str(error))
        if len(limits) < len(self.quota_fields) or not user:
            return
        dispatch(
            lambda: self.lab.admin.set_quota(user, **limits),
            lambda answer: self._quota_saved(user),
            lambda error: self._refused(error, self.quota_errors, self.quota_result),
        )

    def _quota_saved(self, user: str) -> None:
        self.quota_result.value = _ok(f"quota of {user} saved")
        self.request_refresh()

    def _refused(
        self, error: TwargaAPIError, errors: dict[str, widgets.HTML], result: widgets.HTML
    ) -> None:
        field = error_field(error, errors)
        (errors[field] if field else result).value = _bad(error.message)
