"""``VMSnapshots``: one VM's snapshots in a dashboard: the table, taking one by name,
and reverting to or deleting the chosen one after a second, confirming click."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
from traitlets import Dict, Instance, List, Unicode, observe

from twarga_lab.client import VM, Lab, TwargaAPIError
from twarga_lab.widgets.base import dispatch
from twarga_lab.widgets.data import (
    SNAPSHOT_COLUMNS,
    html_table,
    snapshot_rows,
)
from twarga_lab.widgets.data import (
    note as _note,
)

# Statuses in which a VM's snapshots can be taken, reverted to and deleted (the service
# answers 409 in the others).
SNAPSHOT_READY = ("running", "paused", "stopped", "error")


def list_snapshots(lab: Lab, vm: dict[str, Any]) -> list[dict[str, Any]]:
    """VM ``vm``'s snapshots as records (name, created_at, state), oldest first."""
    return VM(lab, vm).snapshots().to_dict("records")


class VMSnapshots(widgets.VBox):
    """The snapshots of one VM (``vm``, a ``VM.to_dict()`` shape, or None): a table, a name
    and "Take snapshot", and Revert / Delete of the snapshot chosen in ``picker``, each taking
    a second click on "Confirm ...". What happens (and the service's refusals) is written to
    ``result``; ``after`` runs after a revert (it changes the VM)."""

    lab = Instance(Lab)
    vm = Dict(default_value=None, allow_none=True, help="The VM whose snapshots are shown.")
    snapshots = List(help="Its snapshots: records with name, created_at and state.")
    list_error = Unicode("", help="Why the snapshots could not be listed ('' when they were).")
    armed = Unicode("", help="The action ('revert', 'delete') awaiting confirmation.")

    def __init__(
        self,
        lab: Lab,
        result: widgets.HTML | None = None,
        after: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lab = lab
        self._after = after
        self._armed_name: str | None = None
        self.heading = widgets.HTML("")
        self.table = widgets.HTML("")
        self.name = widgets.Text(description="Snapshot", placeholder="before-upgrade")
        self.take_button = widgets.Button(
            description="Take snapshot", button_style="primary", icon="camera"
        )
        self.take_button.on_click(lambda _: self.take())
        self.picker = widgets.Dropdown(description="Snapshot", options=[], value=None)
        self.revert_button = widgets.Button(description="Revert", button_style="", icon="undo")
        self.revert_button.on_click(lambda _: self.arm("revert"))
        self.delete_button = widgets.Button(
            description="Delete", button_style="danger", icon="trash"
        )
        self.delete_button.on_click(lambda _: self.arm("delete"))
        self.confirm_button = widgets.Button(
            description="Confirm",
            button_style="danger",
            disabled=True,
            layout=widgets.Layout(display="none"),
        )
        self.confirm_button.on_click(lambda _: self.confirm())
        self.result = result if result is not None else widgets.HTML("")
        self.picker.observe(lambda _: self._disarm(), names="value")
        self.children = [
            self.heading,
            self.table,
            widgets.HBox([self.name, self.take_button]),
            widgets.HBox(
                [self.picker, self.revert_button, self.delete_button, self.confirm_button]
            ),
            *([] if result is not None else [self.result]),
        ]
        self._show()

    # -- state ----------------------------------------------------------------------------

    @observe("vm")
    def _vm_changed(self, change: dict[str, Any]) -> None:
        old, new = change["old"], change["new"]
        if (old or {}).get("id") != (new or {}).get("id"):
            self.snapshots, self.list_error = [], ""
            self._disarm()
            if new is not None:
                self.load()
        self._show()

    @observe("snapshots", "list_error")
    def _listed(self, _: Any) -> None:
        self._show()

    @observe("armed")
    def _armed_changed(self, change: dict[str, Any]) -> None:
        action, name = change["new"], self._armed_name
        with self.confirm_button.hold_sync():
            self.confirm_button.disabled = not action
            self.confirm_button.layout.display = "" if action else "none"
            self.confirm_button.description = (
                f"Confirm {action} {'to' if action == 'revert' else 'of'} {name}"
                if action
                else "Confirm"
            )

    def _disarm(self) -> None:
        self._armed_name = None
        self.armed = ""

    def _show(self) -> None:
        vm = self.vm
        self.layout.display = "none" if vm is None else ""
        if vm is None:
            return
        name = html.escape(vm["name"])
        self.heading.value = f"<b>Snapshots of {name}</b>"
        if self.list_error:
            self.table.value = _note(
                f"The snapshots cannot be listed: {html.escape(self.list_error)}", "#b71c1c"
            )
        else:
            self.table.value = html_table(
                SNAPSHOT_COLUMNS,
                snapshot_rows(self.snapshots),
                empty=f"No snapshots of {vm['name']} yet: take one below.",
            )
        names = [snapshot["name"] for snapshot in self.snapshots]
        with self.picker.hold_sync():
            current = self.picker.value
            if list(self.picker.options) != names:
                self.picker.options = names
            self.picker.value = current if current in names else (names[-1] if names else None)
        ready = vm.get("status") in SNAPSHOT_READY
        self.take_button.disabled = not ready
        self.revert_button.disabled = self.delete_button.disabled = (
            not ready or self.picker.value is None
        )

    # -- actions ----------------------------------------------------------------------------

    def load(self) -> None:
        """List the VM's snapshots again."""
        vm = self.vm
        if vm is None:
            return
        dispatch(
            lambda: list_snapshots(self.lab, vm),
            lambda rows: self._loaded(vm["id"], rows),
            lambda error: self._load_failed(vm["id"], error),
        )

    def apply(self, vm_id: int, rows: list[dict[str, Any]] | None, error: str = "") -> None:
        """Show snapshots listed elsewhere (the dashboard's refresh), if still for this VM."""
        if self.vm is None or self.vm["id"] != vm_id:
            return
        if rows is None:
            self.list_error = error
        else:
            self.snapshots, self.list_error = rows, ""

    def _loaded(self, vm_id: int, rows: list[dict[str, Any]]) -> None:
        self.apply(vm_id, rows)

    def _load_failed(self, vm_id: int, error: TwargaAPIError) -> None:
        self.apply(vm_id, None, error.message)

    def take(self) -> None:
        """Take a snapshot named as the name field says."""
        vm, name = self.vm, self.name.value.strip()
        if vm is None:
            return
        self._disarm()
        if not name:
            self._fail_text("Give the snapshot a name, e.g. before-upgrade.")
            return
        self.result.value = _note(f"taking snapshot {html.escape(name)}…", "#555")
        self.take_button.disabled = True

        def work() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            taken = VM(self.lab, vm).snapshot(name)
            return taken, list_snapshots(self.lab, vm)

        def done(answer: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
            taken, rows = answer
            self.name.value = ""
            self.apply(vm["id"], rows)
            self._done(f"snapshot {taken['name']} of {vm['name']} taken ({taken['state']})")

        dispatch(work, done, self._fail)

    def arm(self, action: str) -> None:
        """First click on Revert or Delete: ask for a confirmation."""
        vm, name = self.vm, self.picker.value
        if vm is None or name is None:
            return
        self._armed_name = name
        self.armed = ""  # a new confirmation, even for the same action
        self.armed = action
        what = (
            f"Revert <b>{html.escape(vm['name'])}</b> to snapshot <b>{html.escape(name)}</b>? "
            "What changed on it since then is lost."
            if action == "revert"
            else f"Delete snapshot <b>{html.escape(name)}</b> of "
            f"<b>{html.escape(vm['name'])}</b>? It cannot be undone."
        )
        self.result.value = _note(f"{what} Click “Confirm …” to go on.", "#b71c1c")

    def confirm(self) -> None:
        """Second click: revert to, or delete, the snapshot the confirmation was asked for."""
        vm, action, name = self.vm, self.armed, self._armed_name
        self._disarm()
        if vm is None or not action or name is None:
            return
        if action == "revert":
            self.result.value = _note(
                f"reverting {html.escape(vm['name'])} to {html.escape(name)}…", "#555"
            )

            def revert() -> tuple[dict[str, Any], list[dict[str, Any]]]:
                after = VM(self.lab, vm).revert(name).to_dict()
                return after, list_snapshots(self.lab, after)

            def reverted(answer: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
                after, rows = answer
                if self.vm is not None and self.vm["id"] == after["id"]:
                    self.vm = after
                self.apply(after["id"], rows)
                self._done(f"{after['name']} reverted to {name}: it is {after['status']}")
                if self._after is not None:
                    self._after()

            dispatch(revert, reverted, self._fail)
            return
        self.result.value = _note(f"deleting snapshot {html.escape(name)}…", "#555")

        def delete() -> list[dict[str, Any]]:
            VM(self.lab, vm).delete_snapshot(name)
            return list_snapshots(self.lab, vm)

        def deleted(rows: list[dict[str, Any]]) -> None:
            self.apply(vm["id"], rows)
            self._done(f"snapshot {name} of {vm['name']} deleted")

        dispatch(delete, deleted, self._fail)

    def _done(self, text: str) -> None:
        self.result.value = _note(html.escape(text), "#1b5e20")
        self._show()

    def _fail_text(self, text: str) -> None:
        self.result.value = _note(f"⚠ {html.escape(text)}", "#b71c1c")
        self._show()

    def _fail(self, error: TwargaAPIError) -> None:
        self._fail_text(error.message)
