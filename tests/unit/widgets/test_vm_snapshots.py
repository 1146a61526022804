"""The snapshots area of ``VMDashboard``, driven like a user would (clicks, field values) and
read back through ``get_state()``, against the real in-process service on libvirt's test
driver: list, take, revert (after a confirmation), delete, and the service's refusals in the
dashboard's status line.

As in ``test_widgets.py``, every blocking client call goes through ``asyncio.to_thread``:
the service runs on the test's event loop.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.helpers import wait_for, wait_status
from twarga_lab.widgets import VMDashboard
from twarga_lab.widgets.data import snapshot_rows


@pytest.fixture
def twarga_config() -> dict[str, Any]:
    return {"max_snapshots_per_vm": 2}


def state(widget: Any, key: str = "value") -> Any:
    """A synced value as the browser would receive it."""
    return widget.get_state()[key]


def run(fn: Any, *args: Any) -> Any:
    """A blocking widget call, off the loop the service runs on."""
    return asyncio.to_thread(fn, *args)


def shown(widget: Any) -> bool:
    return widget.layout.get_state()["display"] != "none"


async def running_vm(api: Any, name: str) -> dict[str, Any]:
    reply = await api("POST", "vms", body={"name": name})
    assert reply.status == 201, reply.json
    return await wait_status(api, reply.json["id"], "running")


async def snapshot_names(api: Any, vm_id: int) -> list[str]:
    reply = await api("GET", f"vms/{vm_id}/snapshots")
    assert reply.status == 200, reply.json
    return [snapshot["name"] for snapshot in reply.json]


def test_snapshot_rows_show_name_time_and_state():
    taken = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows = snapshot_rows(
        [
            {"name": "s1", "created_at": taken, "state": "running"},
            {"name": "<b>", "created_at": "2026-01-02T03:04:05+00:00", "state": "shutoff"},
        ]
    )
    assert [row["Taken"] for row in rows] == ["2026-01-02 03:04:05 UTC"] * 2
    assert rows[0]["Name"] == "s1"
    assert ">running<" in rows[0]["State"] and ">shutoff<" in rows[1]["State"]


async def test_take_shows_the_snapshot_and_refusals_in_the_status_line(lab_as, api):
    vm = await running_vm(api, "box")
    dash = VMDashboard(lab_as("alice"))
    assert await run(dash.refresh), dash.error
    area = dash.snapshots
    assert shown(area) and area.vm["id"] == vm["id"]
    assert "Snapshots of box" in state(area.heading)
    assert "No snapshots of box yet" in state(area.table)
    assert state(area.revert_button, "disabled") and state(area.delete_button, "disabled")
    assert not state(area.take_button, "disabled")

    area.name.value = "s1"
    await run(area.take_button.click)
    assert "snapshot s1 of box taken (running)" in state(dash.actions.result)
    assert "s1" in state(area.table) and "UTC" in state(area.table)
    assert state(area.picker, "_options_labels") == ("s1",)
    assert state(area.name) == ""
    assert not state(area.revert_button, "disabled")
    assert await snapshot_names(api, vm["id"]) == ["s1"]

    # The service's refusals: a duplicate, a bad name, the quota (2 here).
    area.name.value = "s1"
    await run(area.take_button.click)
    assert "already has a snapshot s1" in state(dash.actions.result)
    area.name.value = "Bad Name"
    await run(area.take_button.click)
    assert "lowercase" in state(dash.actions.result)
    area.name.value = ""
    await run(area.take_button.click)
    assert "Give the snapshot a name" in state(dash.actions.result)
    for name in ("s2", "s3"):
        area.name.value = name
        await run(area.take_button.click)
    assert "the most it may have is 2" in state(dash.actions.result)
    assert await snapshot_names(api, vm["id"]) == ["s1", "s2"]
    assert state(area.picker, "_options_labels") == ("s1", "s2")


async def test_revert_needs_a_second_click_and_updates_the_vm(lab_as, api):
    vm = await running_vm(api, "box")
    assert (await api("POST", f"vms/{vm['id']}/snapshots", body={"name": "warm"})).status == 201
    await api("POST", f"vms/{vm['id']}/action", body={"action": "force-stop"})
    await wait_status(api, vm["id"], "stopped")
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    area = dash.snapshots
    assert "warm" in state(area.table)
    assert area.picker.value == "warm"
    confirm = area.confirm_button
    assert not shown(confirm) and state(confirm, "disabled")

    await run(area.revert_button.click)
    assert shown(confirm) and state(confirm, "description") == "Confirm revert to warm"
    assert "Revert <b>box</b> to snapshot <b>warm</b>?" in state(dash.actions.result)
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "stopped"

    await run(confirm.click)
    assert "box reverted to warm: it is running" in state(dash.actions.result)
    assert not shown(confirm)
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "running"
    # The dashboard refreshed after the revert: the table and the picker say running.
    assert "running" in state(dash.table)
    assert "box (running)" in state(dash.actions.picker, "_options_labels")


async def test_delete_needs_a_second_click(lab_as, api):
    vm = await running_vm(api, "box")
    for name in ("first", "second"):
        assert (await api("POST", f"vms/{vm['id']}/snapshots", body={"name": name})).status == 201
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    area = dash.snapshots
    assert area.picker.value == "second"  # the newest is chosen (same second: by name)
    area.picker.value = "first"
    await run(area.delete_button.click)
    assert state(area.confirm_button, "description") == "Confirm delete of first"
    # Choosing another snapshot takes the question back.
    area.picker.value = "second"
    assert not shown(area.confirm_button)
    await run(area.confirm_button.click)
    assert await snapshot_names(api, vm["id"]) == ["first", "second"]

    area.picker.value = "first"
    await run(area.delete_button.click)
    await run(area.confirm_button.click)
    assert "snapshot first of box deleted" in state(dash.actions.result)
    assert await snapshot_names(api, vm["id"]) == ["second"]
    assert state(area.picker, "_options_labels") == ("second",)
    assert "first" not in state(area.table)


async def test_a_snapshot_gone_meanwhile_is_reported(lab_as, api):
    vm = await running_vm(api, "box")
    assert (await api("POST", f"vms/{vm['id']}/snapshots", body={"name": "s1"})).status == 201
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    area = dash.snapshots
    await run(area.revert_button.click)
    assert (await api("DELETE", f"vms/{vm['id']}/snapshots/s1")).status == 204
    await run(area.confirm_button.click)
    assert "VM box has no snapshot s1" in state(dash.actions.result)
    assert (await api("GET", f"vms/{vm['id']}")).json["status"] == "running"


async def test_the_area_follows_the_chosen_vm_and_the_refresh(lab_as, api):
    first = await running_vm(api, "one")
    second = await running_vm(api, "two")
    assert (await api("POST", f"vms/{first['id']}/snapshots", body={"name": "a1"})).status == 201
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    area = dash.snapshots
    assert dash.actions.selected == first["id"] and "a1" in state(area.table)

    await run(setattr, dash.actions.picker, "value", second["id"])
    assert area.vm["id"] == second["id"]
    assert "Snapshots of two" in state(area.heading)
    assert "No snapshots of two yet" in state(area.table)

    # Taken elsewhere (another notebook): the next refresh lists it.
    assert (await api("POST", f"vms/{second['id']}/snapshots", body={"name": "b1"})).status == 201
    await run(dash.refresh)
    assert "b1" in state(area.table) and "a1" not in state(area.table)

    # The VM is destroyed: no VM is left to show snapshots of.
    await api("DELETE", f"vms/{first['id']}")
    await api("DELETE", f"vms/{second['id']}")

    async def gone() -> bool:
        return (await api("GET", "vms")).json == []

    await wait_for(gone, timeout=10)
    await run(dash.refresh)
    assert area.vm is None and not shown(area)


async def test_take_on_the_kernel_loop_does_not_block_it(lab_as, api):
    """In a kernel the click runs on the event loop: the client calls go to a thread."""
    vm = await running_vm(api, "box")
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    dash.snapshots.name.value = "async-1"
    dash.snapshots.take_button.click()  # on the loop: would deadlock if it called the API

    async def listed() -> bool:
        return "async-1" in state(dash.snapshots.table)

    await wait_for(listed, timeout=10)
    assert "snapshot async-1 of box taken" in state(dash.actions.result)
    assert await snapshot_names(api, vm["id"]) == ["async-1"]
