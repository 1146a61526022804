"""The "Ready" column of the VM tables: ``yes`` once the guest has reported in,
``booting…`` while it runs but has not, blank when it is not running; on ``vm_rows`` and
on the ``VMDashboard`` against the in-process service (libvirt's test driver, where the
test writes the guest's console banner into the log the service follows)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_placeholder_image
from tests.helpers import wait_for, wait_status
from twarga_lab.virt.images import TINY_READY_BANNER
from twarga_lab.widgets import VMDashboard
from twarga_lab.widgets.data import VM_COLUMNS, html_table, vm_rows


def vm(name: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": 1,
        "name": name,
        "owner": "alice",
        "status": status,
        "ip_address": None,
        "ssh_port": 22001 if status == "running" else None,
        "uptime": 5 if status == "running" else None,
        "cpu": 1,
        "ram": 512,
        "disk": 10,
        "image": "twarga/tiny",
        **extra,
    }


def cells(table: str) -> dict[str, dict[str, str]]:
    """An :func:`html_table` as ``{name: {column: cell text}}`` (tags stripped)."""
    head = [re.sub(r"<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table)]
    rows = {}
    for body in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[-1]):
        texts = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", body)]
        row = dict(zip(head, texts, strict=True))
        rows[row["Name"]] = row
    return rows


# -- vm_rows ------------------------------------------------------------------------------


def test_the_ready_column_follows_the_status_column():
    assert VM_COLUMNS[:3] == ("Name", "Status", "Ready")


def test_ready_is_yes_booting_or_blank():
    rows = vm_rows(
        [
            vm("up", "running", ready=True),
            vm("boot", "running", ready=False),
            vm("off", "stopped", ready=False),
            vm("coming", "starting", ready=False),
            # A service from before "ready": running is all it can tell.
            vm("old", "running"),
            vm("old-off", "stopped"),
        ]
    )
    assert [row["Ready"] for row in rows] == ["yes", "booting…", "", "", "yes", ""]
    # The owner's table of the admin panel has it too.
    assert vm_rows([vm("boot", "running", ready=False)], owner=True)[0]["Ready"] == "booting…"
    shown = cells(html_table(VM_COLUMNS, rows, empty=""))
    assert shown["boot"]["Ready"] == "booting…" and shown["boot"]["Status"] == "running"
    assert shown["off"]["Ready"] == ""


# -- the dashboard ------------------------------------------------------------------------


@pytest.fixture
def fake_image_dir(tmp_path: Path) -> Path:
    """The placeholder twarga/tiny with tiny's ready banner (the service waits for it)."""
    images = tmp_path / "images"
    folder = make_placeholder_image(images)
    meta = json.loads((folder / "image.json").read_text())
    (folder / "image.json").write_text(json.dumps({**meta, "ready_banner": TINY_READY_BANNER}))
    return images


async def test_the_dashboard_shows_booting_then_yes_then_blank(lab_as, api, twarga):
    reply = await api("POST", "vms", body={"name": "web-1"})
    assert reply.status == 201, reply.json
    vm_id = reply.json["id"]
    running = await wait_status(api, vm_id, "running")
    assert running["ready"] is False
    dash = VMDashboard(lab_as("alice"))

    async def ready_cell() -> str:
        assert await asyncio.to_thread(dash.refresh), dash.error
        return cells(dash.table.get_state()["value"])["web-1"]["Ready"]

    assert await ready_cell() == "booting…"

    log = twarga.services.vms.instance_dir(running["domain"]) / "console.log"
    with log.open("a") as f:
        f.write("Twarga Lab VM web-1 is up\r\n")

    async def shows_yes() -> bool:
        return await ready_cell() == "yes"

    await wait_for(shows_yes, timeout=10)
    row = cells(dash.table.get_state()["value"])["web-1"]
    assert row["Status"] == "running" and row["Uptime"] != "—"

    await api("POST", f"vms/{vm_id}/action", body={"action": "force-stop"})
    await wait_status(api, vm_id, "stopped")
    assert await ready_cell() == ""
