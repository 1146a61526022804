"""The notebook dashboards, driven like a user would (clicks, field values) and read back
through ``get_state()``, against the real in-process service on libvirt's test driver.

The service runs on the test's event loop: every blocking client call (a refresh, a click
that calls the service) goes through ``asyncio.to_thread`` here, as it does in a kernel.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.helpers import wait_for, wait_status
from twarga_lab.client import (
    VM,
    BadRequest,
    Conflict,
    Lab,
    QuotaExceeded,
    ServiceUnavailable,
    ValidationError,
)
from twarga_lab.widgets import AdminPanel, ConsoleWidget, MonitorDashboard, SOCFeed, VMDashboard
from twarga_lab.widgets.console import DISCONNECTED, console_text
from twarga_lab.widgets.data import (
    account_summary,
    count_bars,
    error_field,
    event_rows,
    format_credits,
    format_rate,
    format_uptime,
    history_series,
    html_table,
    merge_events,
    parse_optional_int,
    service_message,
    timeline,
    user_rows,
    vm_options,
    vm_rows,
)


@pytest.fixture
def twarga_config() -> dict[str, Any]:
    # Fast metrics, so the monitor's charts get points within a test.
    return {"metrics_interval": 0.2, "metrics_slow_interval": 0.2}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(widget: Any, key: str = "value") -> Any:
    """A synced value as the browser would receive it."""
    return widget.get_state()[key]


def run(fn: Any, *args: Any) -> Any:
    """A blocking widget call, off the loop the service runs on."""
    return asyncio.to_thread(fn, *args)


# -- pure data shaping --------------------------------------------------------------------


def test_uptime_rates_and_credits_read_like_people_write_them():
    assert [format_uptime(s) for s in (None, 12, 250, 7500, 3 * 86400 + 4 * 3600)] == [
        "—",
        "12s",
        "4m 10s",
        "2h 05m",
        "3d 04h",
    ]
    assert format_rate(512) == "512 B/s"
    assert format_rate(1536) == "1.5 KB/s"
    assert [format_credits(v) for v in (1000.0, 1250.5, 0.0)] == ["1,000", "1,250.5", "0"]


def test_vm_rows_show_status_address_ssh_and_uptime():
    vms = [
        {
            "id": 1,
            "name": "web",
            "owner": "alice",
            "status": "running",
            "ip_address": "10.0.2.15",
            "ssh_port": 22001,
            "uptime": 65,
            "cpu": 1,
            "ram": 512,
            "disk": 10,
            "image": "twarga/tiny",
        },
        {
            "id": 2,
            "name": "db",
            "owner": "bob",
            "status": "error",
            "status_message": "no disk",
            "ip_address": None,
            "ssh_port": None,
            "uptime": None,
            "cpu": 2,
            "ram": 1024,
            "disk": 20,
        },
    ]
    rows = vm_rows(vms, owner=True)
    assert rows[0]["SSH"] == "127.0.0.1:22001"
    assert rows[0]["Uptime"] == "1m 05s"
    assert rows[0]["Size"] == "1 vCPU · 512 MB · 10 GB"
    assert rows[1]["IP"] == rows[1]["SSH"] == rows[1]["Uptime"] == "—"
    assert "no disk" in rows[1]["Status"]
    assert rows[1]["Owner"] == "bob" and rows[1]["Host"] == ""  # (no host: an old server)
    assert vm_options(vms, owner=True) == [("alice/web (running)", 1), ("bob/db (error)", 2)]
    table = html_table(("Name", "Status"), [{"Name": "<b>x</b>", "Status": rows[0]["Status"]}], "")
    assert "&lt;b&gt;x&lt;/b&gt;" in table and "<span" in table  # text escaped, badges kept
    assert "No VMs" in html_table(("Name",), [], empty="No VMs")


def test_account_and_user_rows_show_quota_use():
    me = {
        "name": "alice",
        "admin": False,
        "credits": 990.5,
        "quota": {"max_vms": 5, "max_ram_mb": 8192, "max_cpu": None, "max_disk_gb": None},
        "usage": {"vms": 1, "ram_mb": 512, "cpu": 1, "disk_gb": 10},
    }
    line = account_summary(me)
    assert "990.5" in line and "VMs 1 / 5" in line and "RAM 512 / 8192 MB" in line
    assert "vCPUs 1 / ∞" in line
    rows = user_rows([{**me, "vm_count": 1, "active": True}])
    assert rows[0]["VMs"] == "1 / 5" and rows[0]["Credits"] == "990.5"


def test_errors_are_placed_next_to_their_field():
    fields = ("name", "image", "ram", "cpu", "disk")
    assert error_field(ValidationError(422, "ram must be", "out_of_range", "ram"), fields) == "ram"
    assert error_field(BadRequest(400, "'cpu' must be an integer", "bad_type"), fields) == "cpu"
    assert error_field(Conflict(409, "you already have", "name_taken"), fields) == "name"
    quota = QuotaExceeded(409, "1024 MB more RAM would exceed your quota", "quota_exceeded")
    assert error_field(quota, fields) == "ram"
    assert error_field(QuotaExceeded(409, "no credits left", "no_credits"), fields) is None
    down = service_message(ServiceUnavailable(503, "cannot reach x", "unreachable"), 5)
    assert "unavailable" in down and "Retrying every 5 s" in down
    assert parse_optional_int(" ") is None and parse_optional_int("12") == 12
    with pytest.raises(ValueError):
        parse_optional_int("-3")


def test_events_merge_newest_first_and_stats_become_bars():
    old = [{"id": 3}, {"id": 2}]
    assert [e["id"] for e in merge_events(old, [{"id": 4}, {"id": 5}], limit=3)] == [5, 4, 3]
    rows = event_rows(
        [
            {
                "id": 1,
                "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                "severity": "critical",
                "type": "security",
                "message": "ban",
                "user_name": None,
                "vm_id": 7.0,
                "source": "10.0.2.2",
            }
        ]
    )
    assert rows[0]["Time"] == "2026-01-02 03:04:05" and rows[0]["VM"] == "7"
    assert count_bars({"warning": 2, "info": 5, "odd": 1}, ("info", "warning", "critical")) == (
        ["info", "warning", "odd"],
        [5, 2, 1],
    )
    hours, stacks = timeline(
        [{"start": "2026-01-02T03:00:00+00:00", "count": 3, "info": 2, "warning": 0, "critical": 1}]
    )
    assert hours == ["03:00"] and stacks == [[2], [0], [1]]


def test_history_series_are_naive_utc_datetimes():
    frame = pd.DataFrame({"time": ["2026-01-02T03:00:00+00:00"], "value": [12.5]})
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    x, y = history_series(frame)
    assert x.dtype == np.dtype("datetime64[ms]") and x[0] == np.datetime64("2026-01-02T03:00")
    assert y.tolist() == [12.5]
    assert len(history_series(frame.iloc[0:0])[0]) == 0


def test_console_text_strips_escapes_and_applies_backspaces():
    screen = console_text("", "\x1b[1;32mroot@vm\x1b[0m:~# lx\x08s\r\nbin\r\n", 1000)
    assert screen == "root@vm:~# ls\nbin\n"
    assert console_text("abc", "defgh", 4) == "efgh"


# -- VM dashboard ---------------------------------------------------------------------------


async def test_create_form_shows_each_error_next_to_its_field(lab_as):
    dash = VMDashboard(lab_as("alice"))
    assert await run(dash.refresh), dash.error
    assert "twarga/tiny" in state(dash.fields["image"], "_options_labels")
    dash.fields["name"].value = "Bad Name"
    await run(dash.create_button.click)
    assert "lowercase" in state(dash.errors["name"])
    assert state(dash.errors["ram"]) == ""
    dash.fields["name"].value = "web-1"
    dash.fields["ram"].value = 99999
    await run(dash.create_button.click)
    assert state(dash.errors["name"]) == ""
    assert "ram must be between" in state(dash.errors["ram"])
    assert "No VMs yet" in state(dash.table)


async def test_created_vm_appears_with_credits_and_quota(lab_as, api):
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    assert "1,000</b> credits" in state(dash.account)
    dash.fields["name"].value = "web-1"
    dash.fields["ram"].value = 512
    await run(dash.create_button.click)
    assert "web-1" in state(dash.form_result)
    assert "web-1" in state(dash.table)
    assert "VMs 1 / 5" in state(dash.account)
    assert "web-1 (" in state(dash.actions.picker, "_options_labels")[0]
    # The same name again: the conflict shows next to the name.
    dash.fields["name"].value = "web-1"
    await run(dash.create_button.click)
    assert "already have a VM named" in state(dash.errors["name"])
    vms = (await api("GET", "vms")).json
    assert [vm["name"] for vm in vms] == ["web-1"]


async def test_destroy_needs_a_second_click_on_confirm(lab_as, api):
    reply = await api("POST", "vms", body={"name": "doomed"})
    await wait_status(api, reply.json["id"], "running")
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    confirm = dash.actions.confirm_button
    assert confirm.layout.get_state()["display"] == "none" and state(confirm, "disabled")
    await run(dash.actions.destroy_button.click)
    assert confirm.layout.get_state()["display"] == ""
    assert state(confirm, "description") == "Confirm destroy doomed"
    assert "Confirm destroy" in state(dash.actions.result)
    assert (await api("GET", f"vms/{reply.json['id']}")).json["status"] == "running"
    await run(confirm.click)
    assert "doomed destroyed" in state(dash.actions.result)
    assert (await api("GET", "vms")).json == []
    assert "doomed" not in state(dash.table)
    assert confirm.layout.get_state()["display"] == "none"


async def test_actions_stop_and_start_the_chosen_vm(lab_as, api):
    reply = await api("POST", "vms", body={"name": "box"})
    await wait_status(api, reply.json["id"], "running")
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    await run(dash.actions.buttons["stop"].click)
    await wait_status(api, reply.json["id"], "stopped")
    await run(dash.actions.buttons["start"].click)
    await wait_status(api, reply.json["id"], "running")
    assert "box is" in state(dash.actions.result)


async def test_clicks_on_the_kernel_loop_do_not_block_it(lab_as, api):
    """In a kernel, click handlers run on the event loop: the client calls go to a thread
    and the click returns at once (here the loop also serves the API)."""
    dash = VMDashboard(lab_as("alice"))
    dash.fields["name"].value = "async-1"
    dash.create_button.click()  # on the loop: would deadlock if it called the API inline
    assert state(dash.create_button, "disabled")

    async def listed() -> bool:
        return "async-1" in state(dash.table)

    await wait_for(listed, timeout=10)
    assert not state(dash.create_button, "disabled")
    assert [vm["name"] for vm in (await api("GET", "vms")).json] == ["async-1"]


async def test_service_down_message_then_recovery(lab_as):
    dash = VMDashboard(Lab(f"http://127.0.0.1:{closed_port()}/", "alice-token", timeout=5))
    assert not await run(dash.refresh)
    assert "service is unavailable" in state(dash.message)
    assert dash.message.layout.get_state()["display"] == ""
    dash.lab = lab_as("alice")  # the service is back (here: a Lab that reaches it)
    assert await run(dash.refresh)
    assert state(dash.message) == ""
    assert dash.message.layout.get_state()["display"] == "none"
    assert "alice" in state(dash.account)


async def test_live_refresh_runs_in_the_background(lab_as, api):
    dash = VMDashboard(lab_as("alice"), interval=0.1)
    dash.start()
    try:
        assert dash.live
        await api("POST", "vms", body={"name": "live-1"})  # the loop stays free to answer

        async def shown() -> bool:
            return "live-1" in state(dash.table)

        await wait_for(shown, timeout=10)
    finally:
        dash.stop()
    assert not dash.live


# -- admin ------------------------------------------------------------------------------------


async def test_admin_grant_updates_credits(lab_as, api):
    await api("GET", "me")  # alice exists
    panel = AdminPanel(lab_as("admin"))
    assert await run(panel.refresh)
    assert "alice" in state(panel.grant_fields["user"], "_options_labels")
    panel.grant_fields["user"].value = "alice"
    panel.grant_fields["amount"].value = 250
    await run(panel.grant_button.click)
    assert "reason is required" in state(panel.grant_errors["reason"])
    panel.grant_fields["reason"].value = "course project"
    await run(panel.grant_button.click)
    assert "alice now has 1,250 credits" in state(panel.grant_result)
    assert "1,250" in state(panel.users_table)
    assert (await api("GET", "me")).json["credits"] == 1250
    dash = VMDashboard(lab_as("alice"))
    await run(dash.refresh)
    assert "1,250</b> credits" in state(dash.account)


async def test_admin_quota_edit_and_every_vm(lab_as, api):
    await api("POST", "vms", user="bob", body={"name": "bobs"})
    panel = AdminPanel(lab_as("admin"))
    await run(panel.refresh)
    assert "bobs" in state(panel.vms_table) and "bob" in state(panel.vms_table)
    panel.quota_user.value = "bob"
    assert state(panel.quota_fields["max_vms"]) == "5"
    panel.quota_fields["max_vms"].value = "two"
    await run(panel.quota_button.click)
    assert "whole number" in state(panel.quota_errors["max_vms"])
    panel.quota_fields["max_vms"].value = "2"
    await run(panel.quota_button.click)
    assert "quota of bob saved" in state(panel.quota_result)
    assert (await api("GET", "me", user="bob")).json["quota"]["max_vms"] == 2


async def test_admin_panel_shows_hosts_and_drains_one(lab_as, api):
    panel = AdminPanel(lab_as("admin"))
    assert await run(panel.refresh)
    table = state(panel.hosts_table)
    assert "local" in table and "up" in table and "shared" in table
    assert "TCG" in table  # the test driver's guests are domain type qemu
    assert state(panel.host_picker, "_options_labels") == ("local",)
    await run(panel.drain_button.click)
    assert "host local is draining" in state(panel.host_result)
    assert "draining" in state(panel.hosts_table)
    refused = await api("POST", "vms", body={"name": "nowhere"})
    assert refused.status == 409 and refused.json["reason"] == "no_host"
    await run(panel.undrain_button.click)
    assert "host local is up" in state(panel.host_result)
    assert (await api("POST", "vms", body={"name": "somewhere"})).status == 201


async def test_admin_panel_tells_non_admins(lab_as):
    panel = AdminPanel(lab_as("bob"))
    assert not await run(panel.refresh)
    assert "only admins" in state(panel.message)


# -- SOC --------------------------------------------------------------------------------------


async def test_soc_filters_tail_and_statistics(lab_as, api):
    reply = await api("POST", "vms", body={"name": "soc-1"})
    await wait_status(api, reply.json["id"], "running")
    feed = SOCFeed(lab_as("admin"))
    assert await run(feed.refresh)
    assert "soc-1" in state(feed.table)
    assert feed.statistics.layout.get_state()["display"] == ""
    assert "info" in list(feed.severity_bars.x)
    assert len(feed.timeline_bars.y) == 3 and len(feed.timeline_bars.x) == 24
    await run(setattr, feed.severity_picker, "value", "critical")
    assert feed.severity == "critical"
    assert "No events match" in state(feed.table)
    await run(setattr, feed.severity_picker, "value", "")
    await run(setattr, feed.type_picker, "value", "vm")
    assert feed.events and {e["type"] for e in feed.events} == {"vm"}
    # The tail: a new event shows on the next refresh.
    newest = feed.events[0]["id"]
    await api("POST", "vms", body={"name": "soc-2"})
    await run(feed.refresh)
    assert feed.events[0]["id"] > newest and "soc-2" in state(feed.table)


async def test_soc_statistics_are_for_admins(lab_as, api):
    await api("POST", "vms", body={"name": "mine"})
    feed = SOCFeed(lab_as("alice"))
    assert await run(feed.refresh)
    assert "mine" in state(feed.table)
    assert "for admins" in state(feed.note)
    assert feed.statistics.layout.get_state()["display"] == "none"


# -- monitor ----------------------------------------------------------------------------------


async def test_monitor_range_and_vm_change_call_history(lab_as, api):
    reply = await api("POST", "vms", body={"name": "mon"})
    await wait_status(api, reply.json["id"], "running")
    lab = lab_as("alice")
    calls: list[tuple[str, Any, Any, Any]] = []
    history = lab.metrics.history

    def spy(metric, vm=None, since="-1h", until=None, step=None):
        calls.append((metric, vm, since, step))
        return history(metric, vm=vm, since=since, until=until, step=step)

    lab.metrics.history = spy
    monitor = MonitorDashboard(lab)

    async def host_points() -> bool:
        await run(monitor.refresh)
        return len(monitor.host_charts[0].lines["cpu_usage"].y) > 0

    await wait_for(host_points, timeout=10, interval=0.2)
    assert {since for _, _, since, _ in calls} == {"-1h"}
    assert "CPU" in state(monitor.host_now)
    calls.clear()
    await run(setattr, monitor.range_picker, "value", "7d")
    assert monitor.window == "7d"
    assert calls and {(since, step) for _, _, since, step in calls} == {("-7d", 3600.0)}
    assert {vm for _, vm, _, _ in calls} == {None}  # no VM chosen yet
    calls.clear()
    await run(setattr, monitor.vm_picker, "value", reply.json["id"])
    assert {vm for _, vm, _, _ in calls} == {None, reply.json["id"]}
    assert "mon" in state(monitor.vm_now)
    cpu = monitor.vm_charts[0].lines["cpu_usage"]
    assert len(cpu.x) == len(cpu.y)


# -- console ----------------------------------------------------------------------------------


class FakeConsoleSocket:
    """The websocket-client side of a terminado console, fed by the test."""

    def __init__(self) -> None:
        self.incoming: queue.Queue[str | None] = queue.Queue()
        self.sent: list[list[Any]] = []

    def settimeout(self, timeout: float | None) -> None:
        pass  # the fake socket's queue never times out

    def recv(self) -> str:
        message = self.incoming.get(timeout=10)
        if message is None:
            raise ConnectionError("closed")
        return message

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def send_close(self) -> None:
        pass  # closing is recorded by abort(); nothing to send on a fake

    def abort(self) -> None:
        self.incoming.put(None)

    def shutdown(self) -> None:
        self.incoming.put(None)


def wait_sent(fake: FakeConsoleSocket, message: list[Any]) -> None:
    deadline = time.monotonic() + 5
    while message not in fake.sent:
        assert time.monotonic() < deadline, fake.sent
        time.sleep(0.01)


def test_console_widget_types_reads_and_shows_the_disconnect():
    fake = FakeConsoleSocket()
    vm = VM(Lab("http://127.0.0.1:1/", "t"), {"id": 1, "name": "web", "status": "running"})
    console = ConsoleWidget(vm, connect=lambda timeout: fake)
    assert console.connected and fake.sent == [["set_size", 24, 100]]
    # Typed before virsh is attached: held back, then sent after an Enter for the prompt.
    console.send_line("id")
    assert fake.sent == [["set_size", 24, 100]]
    fake.incoming.put(json.dumps(["stdout", "Escape character is ^] (Ctrl + ])\r\n"]))
    wait_sent(fake, ["stdin", "id\r"])
    assert fake.sent[1:] == [["stdin", "\r"], ["stdin", "id\r"]]
    fake.incoming.put(json.dumps(["stdout", "\x1b[1mroot@web\x1b[0m:~# "]))
    console.wait_for("root@web:~# ", timeout=5)
    assert "root@web:~# " in state(console.screen) and "\x1b" not in state(console.screen)
    console.input.value = "uname -a"
    console._on_input_msg(console.input, {"event": "submit"}, [])  # the browser's Enter
    assert fake.sent[-1] == ["stdin", "uname -a\r"] and console.input.value == ""
    console.ctrl_c_button.click()
    assert fake.sent[-1] == ["stdin", "\x03"]
    fake.incoming.put(json.dumps(["disconnect", 1]))
    console.wait_for(r"\[disconnected\]", timeout=5)
    assert not console.connected
    assert DISCONNECTED in state(console.status)
    assert state(console.ctrl_c_button, "disabled")


def test_console_input_goes_out_after_the_attach_timeout_without_a_banner():
    fake = FakeConsoleSocket()
    vm = VM(Lab("http://127.0.0.1:1/", "t"), {"id": 1, "name": "web", "status": "running"})
    console = ConsoleWidget(vm, connect=lambda timeout: fake, attach_timeout=0.1)
    console.send_line("ls")
    wait_sent(fake, ["stdin", "ls\r"])
    console.disconnect()
    assert not console.connected


def test_console_widget_says_why_it_cannot_connect():
    def refuse(timeout: float) -> Any:
        raise ConnectionRefusedError("connection refused")

    vm = VM(Lab("http://127.0.0.1:1/", "t"), {"id": 1, "name": "web", "status": "running"})
    console = ConsoleWidget(vm, connect=refuse)
    assert not console.connected
    assert "cannot open the console" in state(console.status)


async def test_console_of_someone_elses_vm_is_refused(lab_as, api):
    reply = await api("POST", "vms", user="bob", body={"name": "bobs"})
    await wait_status(api, reply.json["id"], "running", user="bob")
    vm = VM(lab_as("alice"), {**reply.json, "status": "running"})
    console = await run(vm.console)
    assert isinstance(console, ConsoleWidget)
    assert not console.connected
    assert "404" in state(console.status)


def test_quota_use_bars_are_percent_of_each_limit():
    from twarga_lab.widgets.data import quota_use

    me = {
        "quota": {"max_vms": 5, "max_ram_mb": 8192, "max_cpu": None},
        "usage": {"vms": 1, "ram_mb": 2048, "cpu": 2},
    }
    assert quota_use(me) == (["VMs", "RAM"], [20.0, 25.0])
