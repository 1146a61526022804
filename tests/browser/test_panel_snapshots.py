"""VM snapshots from the JupyterLab side panel in a real browser: take one, see it listed,
see a refusal, revert to it (confirming the dialog) and delete it.

The server, Chromium and page are those of ``test_labextension_personal.py`` (a
personal-mode ``jupyter lab`` on libvirt's ``test:///default``); this module gets its own
server.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.browser import test_labextension_personal as personal
from tests.browser.test_labextension_personal import LabServer, create_vm, open_panel, shot

expect = personal.expect
pytestmark = pytest.mark.browser

# The fixtures of the panel tests, used here by name.
jp_asyncio_loop = personal.jp_asyncio_loop
jp_server_cleanup = personal.jp_server_cleanup
lab_server = personal.lab_server
browser = personal.browser
page = personal.page


def snapshot_names(server: LabServer, vm_id: int) -> list[str]:
    reply = server.api("GET", f"twarga/api/vms/{vm_id}/snapshots")
    assert reply.status_code == 200, reply.text
    return [item["name"] for item in reply.json()]


def test_panel_takes_reverts_to_and_deletes_a_snapshot(page: Any, lab_server: LabServer) -> None:
    vm = create_vm(lab_server, "snap-1")
    panel = open_panel(page)
    row = panel.locator('.twarga-vm[data-vm-name="snap-1"]')
    status = row.locator(".twarga-vm-status")
    expect(status).to_have_text("running")
    section = panel.locator(".twarga-snapshots")
    expect(section).to_be_hidden()

    row.locator('[data-action="snapshots"]').click()
    expect(section).to_be_visible()
    expect(row.locator('[data-action="snapshots"]')).to_have_attribute("aria-pressed", "true")
    expect(section.locator(".twarga-section-title")).to_have_text("Snapshots of snap-1")
    expect(section.locator(".twarga-snapshots-empty")).to_have_text(
        "No snapshots yet: take one below."
    )

    # Take one: it is listed with its state and when it was taken.
    section.locator('input[name="snapshot-name"]').fill("before")
    section.locator('[data-action="take-snapshot"]').click()
    snapshot = section.locator('.twarga-snapshot[data-snapshot-name="before"]')
    expect(snapshot.locator(".twarga-snapshot-name")).to_have_text("before")
    expect(snapshot.locator(".twarga-snapshot-state")).to_have_text("running")
    expect(snapshot.locator(".twarga-snapshot-created")).to_have_text(
        re.compile(r"^taken \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
    )
    expect(section.locator(".twarga-snapshots-status")).to_have_text(
        "Snapshot before of snap-1 was taken."
    )
    expect(section.locator(".twarga-snapshots-empty")).to_be_hidden()
    expect(section.locator('input[name="snapshot-name"]')).to_have_value("")
    assert snapshot_names(lab_server, vm["id"]) == ["before"]
    shot(page, "snapshots-taken")

    # The same name again: the service's refusal shows under the list.
    section.locator('input[name="snapshot-name"]').fill("before")
    section.locator('[data-action="take-snapshot"]').click()
    error = section.locator(".twarga-snapshots-error")
    expect(error).to_be_visible()
    expect(error).to_have_text("VM snap-1 already has a snapshot before")
    expect(section.locator(".twarga-snapshot")).to_have_count(1)
    shot(page, "snapshots-duplicate")

    # Stopped, then reverted to the running snapshot: running again. Cancel first.
    row.locator('[data-action="stop"]').click()
    expect(status).to_have_text("stopped")
    snapshot.locator('[data-action="revert-snapshot"]').click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Revert snap-1 to before?")
    shot(page, "snapshots-revert-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)
    expect(status).to_have_text("stopped")

    snapshot.locator('[data-action="revert-snapshot"]').click()
    page.locator(".jp-Dialog").get_by_role("button", name="Revert").click()
    expect(section.locator(".twarga-snapshots-status")).to_have_text(
        "snap-1 was reverted to before: it is running."
    )
    expect(status).to_have_text("running")
    expect(error).to_be_hidden()
    assert lab_server.api("GET", f"twarga/api/vms/{vm['id']}").json()["status"] == "running"

    # Delete it, confirming: the list is empty again, here and on the server.
    snapshot.locator('[data-action="delete-snapshot"]').click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Delete snapshot before?")
    dialog.get_by_role("button", name="Delete").click()
    expect(snapshot).to_have_count(0)
    expect(section.locator(".twarga-snapshots-status")).to_have_text(
        "Snapshot before of snap-1 was deleted."
    )
    expect(section.locator(".twarga-snapshots-empty")).to_have_text(
        "No snapshots yet: take one below."
    )
    assert snapshot_names(lab_server, vm["id"]) == []
    shot(page, "snapshots-deleted")

    # The Snapshots button hides the section again.
    row.locator('[data-action="snapshots"]').click()
    expect(section).to_be_hidden()
