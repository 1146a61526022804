"""The JupyterLab extension in a real browser, against a personal-mode ``jupyter lab``.

Each server is a ``jupyter lab`` subprocess on a free port with the extension on libvirt's
``test:///default`` driver and a placeholder image; Debian's Chromium is driven by
Playwright. Screenshots go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, make_placeholder_image
from tests.helpers import free_port

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
ARTIFACTS = REPO / "test-artifacts" / "browser"
TOKEN = "browser-test-token"
START_DEADLINE = 60.0
# Lab boots in a few seconds; a cold Chromium on two busy cores can take much longer.
UI_TIMEOUT_MS = 60_000

# No announcements feed, no update check: the server must not reach the internet.
LAB_CONFIG = """
c.LabApp.news_url = None
c.LabApp.check_for_updates_class = "jupyterlab.handlers.announcements.NeverCheckForUpdate"
"""


@pytest.fixture
def jp_asyncio_loop() -> None:
    """Overrides pytest-jupyter's autouse loop: Playwright's sync API owns this thread's loop."""
    return None


@pytest.fixture
def jp_server_cleanup() -> None:
    """Overrides pytest-jupyter's autouse cleanup: no in-process server runs here."""
    return None


class LabServer:
    """A personal-mode ``jupyter lab`` subprocess that can be stopped and started again."""

    def __init__(self, root: Path, port: int, extra_args: tuple[str, ...] = ()) -> None:
        self.root = root
        self.port = port
        self.extra_args = extra_args
        self.url = f"http://127.0.0.1:{port}/"
        self.log_path = root / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        (root / "config").mkdir(parents=True, exist_ok=True)
        (root / "config" / "jupyter_lab_config.py").write_text(LAB_CONFIG)
        # Never ask about (or fetch) news: the question would cover part of the screenshots.
        settings = root / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        make_placeholder_image(root / "images")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            f"--port={self.port}",
            "--port-retries=0",
            "--ip=127.0.0.1",
            f"--ServerApp.root_dir={self.root / 'home'}",
            f"--IdentityProvider.token={TOKEN}",
            # Lets the test run commands that have no button (the terminado console).
            "--LabApp.expose_app_in_browser=True",
            "--TwargaLabApp.libvirt_uri=test:///default",
            f"--TwargaLabApp.vms_dir={self.root / 'vms'}",
            f"--TwargaLabApp.db_url=sqlite:///{self.root / 'vms' / 'twarga.db'}",
            f"--TwargaLabApp.images_dir={self.root / 'images'}",
            *self.extra_args,
        ]

    def start(self) -> None:
        (self.root / "home").mkdir(exist_ok=True)
        # Only this server's settings: nothing from a developer's TWARGA_* environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TWARGA_")}
        env |= {
            "JUPYTER_CONFIG_DIR": str(self.root / "config"),
            "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"),
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                code = self.process.returncode
                pytest.fail(f"jupyter lab exited with {code}:\n{self.log_tail()}")
            try:
                reply = self.api("GET", "twarga/api/me", timeout=2)
                if reply.status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet: poll again until the deadline
            time.sleep(0.2)  # poll interval while waiting for the port, under a deadline
        pytest.fail(f"jupyter lab did not answer within {START_DEADLINE} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"token {TOKEN}"}
        return httpx.request(method, self.url + path, headers=headers, **kwargs)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_server(root: Path, extra_args: tuple[str, ...] = ()) -> LabServer:
    """A started server whose Jupyter root holds twarga-lab/Dashboard.ipynb (and no other)."""
    server = LabServer(root, free_port(), extra_args)
    home = root / "home" / "twarga-lab"
    home.mkdir(parents=True)
    notebook = {
        "cells": [
            {"cell_type": "markdown", "id": "intro", "metadata": {}, "source": "# Dashboard"}
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (home / "Dashboard.ipynb").write_text(json.dumps(notebook))
    server.start()
    return server


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    labext = Path(sys.prefix) / "share" / "jupyter" / "labextensions" / "twarga-lab"
    assert (labext / "package.json").exists(), (
        f"the twarga-lab labextension is not installed in {labext}: run `uv sync`"
    )
    server = start_server(tmp_path_factory.mktemp("lab"))
    yield server
    server.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(server.log_path, ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed: apt-get install chromium"
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_lab(browser: Any, server: LabServer, request: pytest.FixtureRequest) -> Any:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    request.addfinalizer(context.close)
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    page.goto(f"{server.url}lab?token={TOKEN}")
    page.locator(".jp-LabShell").wait_for()
    page.locator("#jp-main-statusbar").wait_for()

    def final_screenshot() -> None:
        if not page.is_closed():
            shot(page, f"{request.node.name}-final")

    request.addfinalizer(final_screenshot)
    return page


@pytest.fixture
def page(browser: Any, lab_server: LabServer, request: pytest.FixtureRequest) -> Any:
    return open_lab(browser, lab_server, request)


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def open_panel(page: Any) -> Any:
    """Click the Twarga Lab tab in the left sidebar and wait for the service's answer."""
    panel = page.locator(".twarga-panel")
    # The saved workspace may already show the panel: a click would then collapse it.
    page.evaluate("() => window.jupyterapp.restored")
    if not panel.is_visible():
        page.locator('.lm-TabBar-tab[data-id="twarga-lab-panel"]').click()
    expect(panel).to_be_visible()
    expect(panel).to_have_attribute("data-service", "up")
    return panel


def create_vm(server: LabServer, name: str) -> dict[str, Any]:
    reply = server.api("POST", "twarga/api/vms", json={"name": name})
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_panel_creates_a_vm_and_shows_field_errors(page: Any, lab_server: LabServer) -> None:
    panel = open_panel(page)
    expect(panel.locator(".twarga-credits")).to_have_text("Credits: 1000")
    expect(page.locator(".twarga-statusbar-credits")).to_have_text("Credits: 1000")
    expect(panel.locator('select[name="image"] option')).to_have_text(["twarga/tiny"])
    shot(page, "panel-empty")

    panel.locator('input[name="name"]').fill("web-1")
    panel.locator('[data-action="create"]').click()
    vm = panel.locator('.twarga-vm[data-vm-name="web-1"]')
    expect(vm.locator(".twarga-vm-status")).to_have_text("running")
    expect(vm.locator(".twarga-vm-ssh")).to_have_text(re.compile(r"^ssh 127\.0\.0\.1:\d+$"))
    expect(vm.locator(".twarga-vm-uptime")).to_have_text(re.compile(r"^up \d+"))
    # The placeholder image has no ready banner: ready as soon as it runs.
    expect(vm.locator(".twarga-vm-ready")).to_have_text("ready")
    expect(panel.locator(".twarga-quota")).to_have_text("VMs 1/5 · RAM 512/8192 MB")
    expect(vm.locator('[data-action="start"]')).to_be_disabled()
    expect(vm.locator('[data-action="stop"]')).to_be_enabled()
    shot(page, "panel-vm-running")

    panel.locator('input[name="name"]').fill("Bad_Name")
    panel.locator('[data-action="create"]').click()
    name_error = panel.locator('.twarga-field-error[data-field="name"]')
    expect(name_error).to_be_visible()
    expect(name_error).to_contain_text("lowercase letter")
    shot(page, "panel-bad-name")

    panel.locator('input[name="name"]').fill("big-1")
    panel.locator('input[name="ram"]').fill("999999")
    panel.locator('[data-action="create"]').click()
    expect(panel.locator('.twarga-field-error[data-field="ram"]')).to_contain_text("ram")
    expect(name_error).to_be_hidden()

    panel.locator('input[name="name"]').fill("web-1")
    panel.locator('input[name="ram"]').fill("512")
    panel.locator('[data-action="create"]').click()
    expect(name_error).to_contain_text("already have a VM named 'web-1'")
    expect(panel.locator(".twarga-vm")).to_have_count(1)


def test_vm_buttons_stop_start_and_destroy(page: Any, lab_server: LabServer) -> None:
    create_vm(lab_server, "db-1")
    panel = open_panel(page)
    vm = panel.locator('.twarga-vm[data-vm-name="db-1"]')
    status = vm.locator(".twarga-vm-status")
    expect(status).to_have_text("running")

    vm.locator('[data-action="stop"]').click()
    expect(status).to_have_text("stopped")
    expect(vm.locator(".twarga-vm-ready")).to_be_hidden()
    expect(vm.locator('[data-action="console"]')).to_be_disabled()
    vm.locator('[data-action="start"]').click()
    expect(status).to_have_text("running")

    vm.locator('[data-action="destroy"]').click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Destroy db-1?")
    shot(page, "destroy-confirm")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)
    expect(status).to_have_text("running")

    vm.locator('[data-action="destroy"]').click()
    page.locator(".jp-Dialog").get_by_role("button", name="Destroy").click()
    expect(vm).to_have_count(0)
    names = [item["name"] for item in lab_server.api("GET", "twarga/api/vms").json()]
    assert "db-1" not in names


def test_console_tab_speaks_terminado(page: Any, lab_server: LabServer) -> None:
    # jupyter_server_terminals speaks the protocol the VM console will: the same widget.
    reply = lab_server.api("POST", "api/terminals")
    assert reply.status_code == 200, reply.text
    terminal = reply.json()["name"]
    page.evaluate(
        "path => window.jupyterapp.commands.execute('twarga:open-terminado', "
        "{path, label: 'Console: host terminal'})",
        f"terminals/websocket/{terminal}",
    )
    expect(page.locator(".lm-TabBar-tab", has_text="Console: host terminal")).to_be_visible()
    console = page.locator(".twarga-console:visible")
    expect(console).to_have_attribute("data-state", "connected")
    rows = console.locator(".xterm-rows")

    console.locator(".xterm").click()
    page.keyboard.type("echo hi-$((40+2))\n")
    expect(rows).to_contain_text("hi-42")

    # set_size reached the pty: stty reports as many rows as the tab shows.
    page.keyboard.type('echo "size=$(stty size)"\n')
    expect(rows).to_contain_text(re.compile(r"size=\d+\s\d+"))
    shown = rows.locator(":scope > div").count()
    size = re.search(r"size=(\d+)\s(\d+)", rows.inner_text())
    assert size and int(size.group(1)) == shown
    shot(page, "console-terminado")

    page.set_viewport_size({"width": 1000, "height": 600})
    expect(rows.locator(":scope > div")).not_to_have_count(shown)
    smaller = rows.locator(":scope > div").count()
    page.keyboard.type('clear; echo "size2=$(stty size)"\n')
    expect(rows).to_contain_text(re.compile(rf"size2={smaller}\s\d+"))

    assert lab_server.api("DELETE", f"api/terminals/{terminal}").status_code == 204
    expect(console).to_have_attribute("data-state", "disconnected")
    expect(rows).to_contain_text("[disconnected]")
    shot(page, "console-disconnected")


def test_vm_console_button_opens_a_named_tab(page: Any, lab_server: LabServer) -> None:
    create_vm(lab_server, "con-1")
    panel = open_panel(page)
    vm = panel.locator('.twarga-vm[data-vm-name="con-1"]')
    expect(vm.locator(".twarga-vm-status")).to_have_text("running")
    vm.locator('[data-action="console"]').click()
    expect(page.locator(".lm-TabBar-tab", has_text="Console: con-1")).to_be_visible()
    # The console websocket may not exist yet on the server: either way the tab settles.
    expect(page.locator(".twarga-console:visible")).to_have_attribute(
        "data-state", re.compile("connected|disconnected")
    )
    shot(page, "console-vm")


def wait_for_saved_workspace(server: LabServer, workspace: str, keys: list[str]) -> None:
    """Poll the saved workspace until the layout restorer has written every key."""
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        reply = server.api("GET", f"lab/api/workspaces/{workspace}")
        if reply.status_code == 200:
            data = reply.json().get("data", {})
            if all(key in data for key in keys):
                return
        time.sleep(0.2)  # poll interval while Lab's state database saves, under a deadline
    pytest.fail(f"workspace {workspace} never saved {keys}: it has {sorted(data)}")


def test_console_tabs_come_back_after_a_reload(
    page: Any, lab_server: LabServer, request: pytest.FixtureRequest
) -> None:
    # A workspace of its own: the tabs other tests leave open are not restored here.
    workspace = "console-reload"
    page.goto(f"{lab_server.url}lab/workspaces/{workspace}?token={TOKEN}")
    page.locator(".jp-LabShell").wait_for()
    page.evaluate("() => window.jupyterapp.restored")

    # A real console: a host terminal, whose shell keeps a variable across the reload.
    reply = lab_server.api("POST", "api/terminals")
    assert reply.status_code == 200, reply.text
    terminal = reply.json()["name"]
    request.addfinalizer(lambda: lab_server.api("DELETE", f"api/terminals/{terminal}"))
    path = f"terminals/websocket/{terminal}"
    page.evaluate(
        "path => window.jupyterapp.commands.execute('twarga:open-terminado', "
        "{path, label: 'Console: kept terminal'})",
        path,
    )
    terminal_tab = page.locator(".lm-TabBar-tab", has_text="Console: kept terminal")
    expect(terminal_tab).to_be_visible()
    console = page.locator(".twarga-console:visible")
    expect(console).to_have_attribute("data-state", "connected")
    console.locator(".xterm").click()
    page.keyboard.type("KEPT=kept-$((3+4))\n")
    expect(console.locator(".xterm-rows")).to_contain_text("KEPT=kept-$((3+4))")

    # A VM console, opened from the panel (the test driver's VMs have no serial line,
    # so this tab settles as disconnected; the tab and its console are what come back).
    vm = create_vm(lab_server, "rel-1")
    panel = open_panel(page)
    row = panel.locator('.twarga-vm[data-vm-name="rel-1"]')
    expect(row.locator(".twarga-vm-status")).to_have_text("running")
    row.locator('[data-action="console"]').click()
    vm_tab = page.locator(".lm-TabBar-tab", has_text="Console: rel-1")
    expect(vm_tab).to_be_visible()
    expect(page.locator(".twarga-console:visible")).to_have_attribute(
        "data-state", re.compile("^(connected|disconnected)$")
    )
    wait_for_saved_workspace(
        lab_server,
        workspace,
        [f"twarga-console:vm-{vm['id']}", f"twarga-terminado:path-{path}"],
    )
    shot(page, "console-before-reload")

    page.reload()
    page.locator(".jp-LabShell").wait_for()
    page.evaluate("() => window.jupyterapp.restored")

    # Both tabs are back, by name, each showing its console.
    expect(vm_tab).to_have_count(1)
    expect(terminal_tab).to_have_count(1)
    vm_tab.click()
    vm_console = page.locator(".twarga-console-tab:visible .twarga-console")
    expect(vm_console).to_have_attribute("data-state", re.compile("^(connected|disconnected)$"))
    expect(vm_console.locator(".xterm")).to_be_visible()
    shot(page, "console-vm-restored")

    # The terminal tab is connected to the same shell as before the reload.
    terminal_tab.click()
    console = page.locator(".twarga-console:visible")
    expect(console).to_have_attribute("data-state", "connected")
    console.locator(".xterm").click()
    page.keyboard.type('echo "got=$KEPT"\n')
    expect(console.locator(".xterm-rows")).to_contain_text("got=kept-7")
    shot(page, "console-terminal-restored")


def test_launcher_opens_notebooks_and_reports_missing_ones(page: Any) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('launcher:create')")
    section = page.locator(".jp-Launcher:visible .jp-Launcher-section").filter(
        has=page.locator(".jp-Launcher-sectionTitle", has_text="Twarga Lab")
    )
    expect(section.locator(".jp-LauncherCard")).to_have_text(
        ["New Lab", "Dashboard", "Monitor", "SOC", "Admin", "Python API"]
    )
    shot(page, "launcher")

    section.locator(".jp-LauncherCard", has_text="Monitor").click()
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Notebook not found")
    expect(dialog).to_contain_text("twarga-lab/Monitor.ipynb")
    shot(page, "launcher-missing-notebook")
    dialog.get_by_role("button", name="Ok").click()
    expect(dialog).to_have_count(0)

    section.locator(".jp-LauncherCard", has_text="Dashboard").click()
    expect(page.locator(".lm-TabBar-tab", has_text="Dashboard.ipynb")).to_be_visible()


def test_panel_reports_an_outage_and_recovers(
    browser: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = start_server(tmp_path)
    request.addfinalizer(server.stop)
    page = open_lab(browser, server, request)
    panel = open_panel(page)

    server.stop()
    expect(panel).to_have_attribute("data-service", "down")
    expect(panel.locator(".twarga-service-status")).to_contain_text("cannot be reached")
    expect(page.locator(".twarga-statusbar-credits")).to_contain_text("offline")
    shot(page, "outage-down")

    server.start()
    # The poll backs off to at most 30 s between tries, then finds the server again.
    expect(panel).to_have_attribute("data-service", "up", timeout=45_000)
    expect(panel.locator(".twarga-service-status")).to_be_hidden()
    expect(page.locator(".twarga-statusbar-credits")).to_have_text(re.compile(r"^Credits: \d"))
    # JupyterLab's own "Server Connection Error" dialog may still be up: close it.
    close = page.locator(".jp-Dialog").get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    shot(page, "outage-recovered")


def test_a_lab_shows_grouped_with_its_networks_and_segment_addresses(
    browser: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # A server of its own: the lab's VMs count against the same quota as the other tests'.
    # The shipped attack-defend template's machines have 128 MB.
    server = start_server(tmp_path, ("--TwargaLabApp.min_ram_mb=64",))
    request.addfinalizer(server.stop)
    create_vm(server, "solo")
    reply = server.api(
        "POST", "twarga/api/labs", json={"template": "attack-defend", "name": "mine"}
    )
    assert reply.status_code == 201, reply.text
    made = reply.json()
    addresses = {vm["name"]: vm["addresses"]["lan"] for vm in made["vms"]}
    assert sorted(addresses.values()) == ["10.77.0.11", "10.77.0.12"]

    page = open_lab(browser, server, request)
    panel = open_panel(page)
    group = panel.locator('.twarga-lab[data-lab-name="mine"]')
    expect(group.locator(".twarga-lab-name")).to_have_text("mine")
    expect(group.locator(".twarga-lab-template")).to_have_text("template attack-defend")
    expect(group.locator(".twarga-lab-networks")).to_have_text("networks lan 10.77.0.0/24")
    expect(group.locator(".twarga-lab-status")).to_have_text("running")
    members = group.locator(".twarga-lab-vms .twarga-vm")
    expect(members.locator(".twarga-vm-name")).to_have_text(list(addresses))
    expect(members.locator(".twarga-vm-addresses")).to_have_text(
        [f"lan {address}" for address in addresses.values()]
    )
    expect(members.locator(".twarga-vm-status")).to_have_text(["running", "running"])
    # The plain VM stays in the plain list, without addresses.
    plain = panel.locator(".twarga-vm-list > .twarga-vm")
    expect(plain.locator(".twarga-vm-name")).to_have_text(["solo"])
    expect(plain.locator(".twarga-vm-addresses")).to_be_hidden()
    shot(page, "lab-grouped")

    # The lab's buttons act on all its VMs.
    group.locator('[data-lab-action="stop"]').click()
    expect(group.locator(".twarga-lab-status")).to_have_text("stopped")
    expect(members.locator(".twarga-vm-status")).to_have_text(["stopped", "stopped"])
    assert server.api("GET", f"twarga/api/labs/{made['id']}").json()["status"] == "stopped"
    expect(plain.locator(".twarga-vm-status")).to_have_text(["running"])

    # "New Lab" on the launcher: the templates, the service's refusal, then a lab.
    page.evaluate("() => window.jupyterapp.commands.execute('launcher:create')")
    launcher = page.locator(".jp-Launcher:visible .jp-Launcher-section").filter(
        has=page.locator(".jp-Launcher-sectionTitle", has_text="Twarga Lab")
    )
    launcher.locator(".jp-LauncherCard", has_text="New Lab").click()
    dialog = page.locator(".jp-Dialog")
    templates = dialog.locator(".twarga-newlab-template-name")
    expect(templates).to_have_text(["attack-defend", "web-db"])
    name = dialog.locator('input[name="lab-name"]')
    expect(name).to_have_value("attack-defend")
    name.fill("mine")
    dialog.get_by_role("button", name="Create lab").click()
    expect(dialog.locator(".twarga-newlab-error")).to_have_text(
        re.compile(r"already has a lab named 'mine'$")
    )
    shot(page, "lab-new-refused")
    name.fill("other")
    dialog.get_by_role("button", name="Create lab").click()
    expect(dialog).to_have_count(0)
    other = panel.locator('.twarga-lab[data-lab-name="other"]')
    expect(other.locator(".twarga-lab-status")).to_have_text("running")
    expect(other.locator(".twarga-vm-addresses")).to_have_text(["lan 10.77.0.11", "lan 10.77.0.12"])
    shot(page, "lab-new-made")

    # Destroy asks first, then the lab and its VMs are gone.
    group.locator('[data-lab-action="destroy"]').click()
    confirm = page.locator(".jp-Dialog")
    expect(confirm).to_contain_text("Destroy lab mine?")
    confirm.get_by_role("button", name="Destroy").click()
    expect(group).to_have_count(0)
    expect(panel.locator(".twarga-lab")).to_have_count(1)
    deadline = time.monotonic() + UI_TIMEOUT_MS / 1000
    while True:
        labs = [lab["name"] for lab in server.api("GET", "twarga/api/labs").json()]
        vms = [vm["name"] for vm in server.api("GET", "twarga/api/vms").json()]
        if labs == ["other"] and not any(vm.startswith("mine-") for vm in vms):
            break
        assert time.monotonic() < deadline, f"lab mine is not gone: labs {labs}, VMs {vms}"
        time.sleep(0.2)  # poll interval while the lab's VMs are destroyed, under a deadline
    assert "solo" in vms
