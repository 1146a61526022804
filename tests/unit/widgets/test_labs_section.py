"""Labs in the ``VMDashboard``: each lab with its template, status, networks (cidr) and its
VMs' segment addresses, start / stop / destroy of a lab, a lab from a template, and the
idle-stop time of a running VM.

The dashboard talks through the real notebook client (``Lab``) to a fake service on an
``httpx.MockTransport``: ``me``, ``vms`` and ``images`` from memory, the labs API from the
fake of ``tests/unit/labs_fake.py`` (the JSON of notes/labs-contract.md). No event loop
runs, so button clicks make their client calls before they return.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.unit.labs_fake import ApiError, FakeTwarga
from twarga_lab.client import Lab
from twarga_lab.widgets import VMDashboard
from twarga_lab.widgets.labs import (
    addresses_label,
    idle_stop_label,
    lab_vm_rows,
    networks_label,
)

# 14:05 today in this machine's time zone, as the service sends it (UTC, ISO 8601).
AT_1405 = datetime.now().astimezone().replace(hour=14, minute=5, second=0, microsecond=0)


def text(markup: str) -> str:
    """What a person reads in an HTML widget value (tags dropped, spaces collapsed)."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", markup)).strip())


def table_rows(markup: str) -> dict[str, dict[str, str]]:
    """An ``html_table`` as ``{name: {column: cell text}}``."""
    head = [text(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", markup)]
    rows: dict[str, dict[str, str]] = {}
    for body in re.findall(r"<tr>(.*?)</tr>", markup.split("<tbody>", 1)[-1]):
        cells = [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", body)]
        row = dict(zip(head, cells, strict=True))
        rows[row["Name"]] = row
    return rows


def lab_blocks(markup: str) -> dict[str, str]:
    """The labs of the labs view: ``{lab name: its HTML}``."""
    parts = re.split(r"(?=<div class='twarga-lab' )", markup)
    blocks = {}
    for part in parts:
        match = re.match(r"<div class='twarga-lab' data-lab='([^']+)'", part)
        if match:
            blocks[match.group(1)] = part
    return blocks


class FakeService:
    """``me``, ``vms``, ``images`` from memory and the labs API of :class:`FakeTwarga`,
    served to one user's client through an ``httpx.MockTransport``."""

    def __init__(self, labs_api: FakeTwarga, user: str = "alice") -> None:
        self.labs_api = labs_api
        self.user = user
        self.plain: list[dict[str, Any]] = [
            self.vm(1, "web-1", "running", idle_stop_at=AT_1405.astimezone(UTC).isoformat()),
            self.vm(2, "db-1", "stopped"),
        ]
        # What `GET labs` answers instead of the lab list: a service without labs (404)...
        self.labs_error: tuple[int, str, str] | None = None
        self.requests: list[tuple[str, str, Any]] = []

    def vm(self, vm_id: int, name: str, status: str, **extra: Any) -> dict[str, Any]:
        return {
            "id": vm_id,
            "name": name,
            "owner": self.user,
            "status": status,
            "status_message": None,
            "image": "twarga/tiny",
            "os_type": "linux",
            "ram": 128,
            "cpu": 1,
            "disk": 1,
            "ip_address": None,
            "ssh_host": "127.0.0.1",
            "ssh_port": 22000 + vm_id if status == "running" else None,
            "uptime": 30 if status == "running" else 0,
            "lab_id": None,
            "lab_name": None,
            "addresses": {},
            "idle_stop_at": None,
            **extra,
        }

    def all_vms(self) -> list[dict[str, Any]]:
        """The plain VMs, then every lab VM of this user as `GET vms` lists them."""
        listed = list(self.plain)
        _, labs = self.labs_api.handle(self.user, "GET", "labs", {}, "")
        for lab in labs:
            for member in lab["vms"]:
                listed.append({**self.vm(member["id"], member["name"], member["status"]), **member})
        return listed

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/twarga/api/")
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.method, path, body))
        try:
            status, answer = self.route(request.method, path, body, request.url.query.decode())
        except ApiError as error:
            status, answer = error.status, {"message": error.message, "reason": error.reason}
        if answer is None:
            return httpx.Response(status)
        return httpx.Response(status, json=answer)

    def route(self, method: str, path: str, body: Any, query: str) -> tuple[int, Any]:
        if (method, path) == ("GET", "me"):
            vms = self.all_vms()
            return 200, {
                "name": self.user,
                "admin": False,
                "credits": 1000,
                "quota": {"max_vms": 10, "max_ram_mb": 8192, "max_cpu": None, "max_disk_gb": None},
                "usage": {"vms": len(vms), "ram_mb": 128 * len(vms), "cpu": len(vms), "disk_gb": 1},
            }
        if (method, path) == ("GET", "images"):
            return 200, [{"name": "twarga/tiny", "kind": "kernel", "os_type": "linux"}]
        if (method, path) == ("GET", "vms"):
            return 200, self.all_vms()
        if path == "labs" and method == "GET" and self.labs_error is not None:
            raise ApiError(*self.labs_error)
        if path.startswith("lab"):
            return self.labs_api.handle(self.user, method, path, body, query)
        raise ApiError(404, f"no route {method} {path}", "not_found")


@pytest.fixture
def labs_api() -> FakeTwarga:
    # Used without its HTTP thread: the transport calls its handler directly.
    fake = FakeTwarga(boot_seconds=0)
    yield fake
    fake._server.server_close()


@pytest.fixture
def service(labs_api: FakeTwarga) -> FakeService:
    return FakeService(labs_api)


@pytest.fixture
def client(service: FakeService) -> Iterator[Lab]:
    lab = Lab("http://twarga.test/", "alice-token", timeout=5)
    lab._http.close()
    lab._http = httpx.Client(
        base_url=lab.url,
        headers={"Authorization": "token alice-token"},
        transport=httpx.MockTransport(service),
    )
    yield lab
    lab._http.close()


@pytest.fixture
def dash(client: Lab) -> VMDashboard:
    return VMDashboard(client)


def make_lab(client: Lab, name: str = "mine") -> dict[str, Any]:
    return client.create_lab("attack-defend", name).to_dict()


# -- the labels ----------------------------------------------------------------------------


def test_idle_stop_label_is_the_local_time_of_a_running_vm():
    utc = AT_1405.astimezone(UTC).isoformat()
    assert idle_stop_label({"status": "running", "idle_stop_at": utc}) == (
        "stops when idle at 14:05"
    )
    # "Z" is how some services write UTC.
    z = AT_1405.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert idle_stop_label({"status": "running", "idle_stop_at": z}) == "stops when idle at 14:05"
    assert idle_stop_label({"status": "running", "idle_stop_at": None}) == ""
    assert idle_stop_label({"status": "stopped", "idle_stop_at": utc}) == ""
    assert idle_stop_label({"status": "running", "idle_stop_at": "soon"}) == ""


def test_addresses_networks_and_lab_vm_rows():
    lab = {
        "networks": [
            {"name": "lan", "cidr": "10.77.0.0/24"},
            {"name": "dmz", "cidr": "10.78.0.0/29"},
        ],
        "vms": [
            {"id": 5, "name": "mine-a", "machine": "a", "status": "running", "ssh_port": 22005,
             "addresses": {"lan": "10.77.0.11", "dmz": "10.78.0.2"}},
        ],
    }  # fmt: skip
    assert networks_label(lab) == "lan 10.77.0.0/24 · dmz 10.78.0.0/29"
    assert addresses_label(lab["vms"][0]) == "lan 10.77.0.11 · dmz 10.78.0.2"
    # The VM list completes the lab's entry (here: the idle-stop time).
    full = [{"id": 5, "status": "running", "idle_stop_at": AT_1405.isoformat()}]
    [row] = lab_vm_rows(lab, full)
    assert row["Name"] == "mine-a" and row["Machine"] == "a"
    assert row["Addresses"] == "lan 10.77.0.11 · dmz 10.78.0.2"
    assert row["SSH"] == "127.0.0.1:22005" and row["Idle stop"] == "stops when idle at 14:05"


# -- the dashboard -------------------------------------------------------------------------


def test_labs_show_with_template_status_networks_and_segment_addresses(dash, client):
    make_lab(client)
    assert dash.refresh(), dash.error
    assert dash.labs.layout.display == ""
    blocks = lab_blocks(dash.labs.view.value)
    assert list(blocks) == ["mine"]
    head = text(blocks["mine"].split("<table", 1)[0])
    assert head == "mine running template attack-defend · networks lan 10.77.0.0/24"
    rows = table_rows(blocks["mine"])
    assert list(rows) == ["mine-attacker", "mine-target"]
    assert rows["mine-attacker"]["Machine"] == "attacker"
    assert rows["mine-attacker"]["Addresses"] == "lan 10.77.0.11"
    assert rows["mine-target"]["Addresses"] == "lan 10.77.0.12"
    assert rows["mine-target"]["Status"] == "running"
    # The plain VMs stay in the VM table, the lab's VMs are not repeated there.
    assert list(table_rows(dash.table.value)) == ["web-1", "db-1"]
    # Every VM can still be picked for its own actions and snapshots.
    assert [label.split(" (")[0] for label, _ in dash.actions.picker.options] == [
        "web-1",
        "db-1",
        "mine-attacker",
        "mine-target",
    ]
    assert [label for label, _ in dash.labs.picker.options] == ["mine (running)"]


def test_a_running_vm_says_when_the_idle_stop_will_stop_it(dash, service):
    assert dash.refresh(), dash.error
    rows = table_rows(dash.table.value)
    assert rows["web-1"]["Idle stop"] == "stops when idle at 14:05"
    assert rows["db-1"]["Idle stop"] == ""
    # Without any time the column is not shown at all.
    service.plain[0]["idle_stop_at"] = None
    assert dash.refresh()
    assert "Idle stop" not in text(dash.table.value)


def test_lab_stop_start_and_destroy_after_a_second_click(dash, client, labs_api, service):
    lab_id = make_lab(client)["id"]
    assert dash.refresh()
    section = dash.labs
    assert section.selected == lab_id
    assert section.buttons["start"].disabled and not section.buttons["stop"].disabled

    section.buttons["stop"].click()
    assert ("POST", f"labs/{lab_id}/action", {"action": "stop"}) in service.requests
    assert labs_api.labs[lab_id]["status"] == "stopped"
    assert text(section.result.value) == "lab mine is stopped"
    # The dashboard refreshed after the action: the lab and its VMs read stopped.
    blocks = lab_blocks(section.view.value)
    assert text(blocks["mine"].split("<table", 1)[0]).startswith("mine stopped")
    assert {r["Status"] for r in table_rows(blocks["mine"]).values()} == {"stopped"}
    assert not section.buttons["start"].disabled and section.buttons["stop"].disabled

    section.buttons["start"].click()
    assert text(section.result.value) == "lab mine is running"

    # Destroy asks first: nothing is sent until "Confirm destroy".
    section.destroy_button.click()
    assert section.confirm_button.layout.display == ""
    assert section.confirm_button.description == "Confirm destroy mine"
    assert "its 2 VMs, their disks and its networks" in text(section.result.value)
    assert labs_api.labs[lab_id]["status"] == "running"
    section.confirm_button.click()
    assert labs_api.labs[lab_id]["status"] == "destroyed"
    assert text(section.result.value) == "lab mine destroyed"
    assert section.confirm_button.layout.display == "none"
    assert lab_blocks(section.view.value) == {}
    assert "No labs yet" in text(section.view.value)
    assert section.picker.options == () and section.destroy_button.disabled


def test_a_refused_lab_action_shows_the_services_message(dash, client, labs_api, monkeypatch):
    make_lab(client)
    assert dash.refresh()

    def refuse(*args: Any) -> Any:
        raise ApiError(402, "not enough credits to start lab mine", "insufficient_credits")

    monkeypatch.setattr(labs_api, "_get_lab", refuse)
    dash.labs.buttons["stop"].click()
    assert text(dash.labs.result.value) == "⚠ not enough credits to start lab mine"


def test_a_lab_from_a_template_and_the_refusal_of_a_taken_name(dash, labs_api):
    assert dash.refresh()
    section = dash.labs
    assert "No labs yet" in text(section.view.value)
    assert section.template.options == (("attack-defend — Attacker and target", "attack-defend"),)
    assert section.template.value == "attack-defend"

    section.name.value = "Not A Name"
    section.create_button.click()
    assert "lower-case letters" in text(section.form_result.value)
    assert labs_api.labs == {}

    section.name.value = "mine"
    section.create_button.click()
    assert [lab["name"] for lab in labs_api.labs.values()] == ["mine"]
    assert text(section.form_result.value).startswith("lab mine is ")
    assert section.name.value == ""
    assert list(lab_blocks(section.view.value)) == ["mine"]

    section.name.value = "mine"
    section.create_button.click()
    assert text(section.form_result.value) == "⚠ alice already has a lab 'mine'"
    assert not section.create_button.disabled
    assert len(labs_api.labs) == 1


def test_a_service_without_labs_shows_the_vms_as_before(dash, client, service):
    make_lab(client)
    service.labs_error = (404, "Not Found", "not_found")
    assert dash.refresh(), dash.error
    assert dash.labs.layout.display == "none"
    # Without the lab list every VM is in the table.
    assert list(table_rows(dash.table.value)) == ["web-1", "db-1", "mine-attacker", "mine-target"]
    assert dash.error == ""


def test_labs_that_cannot_be_listed_say_why_and_the_vms_still_show(dash, service):
    service.labs_error = (500, "the labs database is locked", "internal")
    assert dash.refresh(), dash.error
    assert dash.labs.layout.display == ""
    assert text(dash.labs.view.value) == "The labs cannot be listed: the labs database is locked"
    assert list(table_rows(dash.table.value)) == ["web-1", "db-1"]
    # When the labs answer again they show.
    service.labs_error = None
    assert dash.refresh()
    assert "No labs yet" in text(dash.labs.view.value)
