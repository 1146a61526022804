"""The whole journey in Debian's Chromium through the real Hub and a real guest: sign up,
the admin approves, log in, JupyterLab opens, a VM is created from the panel and runs, its
console tab shows a typed command's output, and the Dashboard notebook renders its widgets
and a chart. Screenshots of each step go to ``test-artifacts/browser/hub-journey/``."""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.helpers import destroy_domains
from tests.hub.conftest import ADMIN_PASSWORD, HubProcess, prepare_hub

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.hub, pytest.mark.real]

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
ARTIFACTS = REPO / "test-artifacts" / "browser" / "hub-journey"
PASSWORD = "Journey-Horse-42-Staple"
NEWS_PLUGIN = "@jupyterlab/apputils-extension:announcements"
SLOW = 120_000  # ms: a cold server spawn and a TCG boot on two busy cores


@pytest.fixture
def jp_asyncio_loop() -> None:
    """Playwright's sync API owns this thread's loop (overrides pytest-jupyter's fixture)."""
    return None


@pytest.fixture
def jp_server_cleanup() -> None:
    return None


@pytest.fixture(scope="module")
def real_hub() -> Iterator[HubProcess]:
    images = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
    if not (images / "twarga" / "tiny" / "image.json").exists():
        pytest.fail(f"no twarga/tiny under {images}: run `make image` (make test does)")
    root = Path("/tmp") / f"twarga-journey-{uuid.uuid4().hex[:8]}"
    prefix = f"twj{uuid.uuid4().hex[:6]}-"
    env = prepare_hub(
        root,
        images,
        "qemu:///system",
        prefix,
        "--TwargaLabApp.ssh_port_min=23600",
        "--TwargaLabApp.ssh_port_max=23699",
    )
    hub = HubProcess(env, root)
    hub.start()
    yield hub
    hub.stop()
    destroy_domains(prefix)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(hub.log, ARTIFACTS / "hub.log")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def log_in(page: Any, hub: HubProcess, name: str, password: str) -> None:
    page.goto(f"{hub.url}/hub/login")
    page.locator("#username_input").fill(name)
    page.locator("#password_input").fill(password)
    page.locator("#login_submit").click()


def test_the_whole_journey(browser: Any, real_hub: HubProcess) -> None:
    hub = real_hub
    name = f"jo{uuid.uuid4().hex[:6]}"
    user = browser.new_context(viewport={"width": 1400, "height": 900})
    page = user.new_page()
    page.set_default_timeout(SLOW)
    try:
        # 1. Sign up.
        page.goto(f"{hub.url}/hub/login")
        page.locator("#twarga-signup").click()
        page.locator("#username_input").fill(name)
        page.locator("#password_input").fill(PASSWORD)
        page.locator("#password_confirm_input").fill(PASSWORD)
        page.locator("#signup_submit").click()
        expect(page.locator("#twarga-signup-done")).to_contain_text("approval")
        shot(page, "01-signed-up")

        # 2. The admin approves.
        admin = browser.new_context().new_page()
        log_in(admin, hub, "admin", ADMIN_PASSWORD)
        admin.goto(f"{hub.url}/hub/twarga-accounts")
        row = admin.locator(f'tr[data-account="{name}"]')
        row.get_by_role("button", name="Approve").click()
        expect(admin.locator("#twarga-notice")).to_contain_text(f"{name} is approved")
        shot(admin, "02-admin-approved")
        admin.context.close()

        # 3. Log in: the Hub spawns JupyterLab as the user's own account.
        log_in(page, hub, name, PASSWORD)
        page.wait_for_url(re.compile(rf"/user/{name}/lab"), timeout=SLOW)
        page.locator(".jp-LabShell").wait_for()
        # No "Would you like to get notified about official Jupyter news?": the plugin that
        # asks is off in users' servers (checked again once the journey is over).
        config = page.evaluate(
            "JSON.parse(document.getElementById('jupyter-config-data').textContent)"
        )
        assert NEWS_PLUGIN in config["disabledExtensions"]
        shot(page, "03-jupyterlab")

        # 4. Create a VM from the panel and see it running.
        panel = page.locator(".twarga-panel")
        if not panel.is_visible():
            page.locator('.lm-TabBar-tab[data-id="twarga-lab-panel"]').click()
        expect(panel).to_have_attribute("data-service", "up")
        panel.locator('input[name="name"]').fill("web-1")
        # Several images (debian/12 sorts first): the form starts on the service's default.
        expect(panel.locator('select[name="image"]')).to_have_value("twarga/tiny")
        panel.locator('[data-action="create"]').click()
        vm = panel.locator('.twarga-vm[data-vm-name="web-1"]')
        expect(vm.locator(".twarga-vm-status")).to_have_text("running", timeout=SLOW)
        shot(page, "04-vm-running")

        # 5. Its console tab shows the output of a typed command.
        vm.locator('[data-action="console"]').click()
        console = page.locator(".twarga-console:visible")
        expect(console).to_have_attribute("data-state", "connected")
        rows = console.locator(".xterm-rows")
        expect(rows).to_contain_text("Escape character")
        console.locator(".xterm").click()
        # The guest may still be booting (or long done: output nobody read is not replayed):
        # press Enter until its shell answers with a prompt, as a person would.
        prompt = re.compile(r"root@web-1:~#")
        deadline = time.monotonic() + SLOW / 1000
        while True:
            page.keyboard.press("Enter")
            try:
                expect(rows).to_contain_text(prompt, timeout=3000)
                break
            except AssertionError:
                assert time.monotonic() < deadline, rows.text_content()
        page.keyboard.type("echo $((6*7))")
        page.keyboard.press("Enter")
        expect(rows).to_contain_text(re.compile(r"echo \$\(\(6\*7\)\)\s*42"))
        shot(page, "05-console")

        # 6. The Dashboard notebook runs and renders its widgets and a chart.
        page.get_by_role("menuitem", name="File").click()
        page.get_by_role("menuitem", name="New Launcher").click()
        section = page.locator(".jp-Launcher:visible .jp-Launcher-section").filter(
            has=page.locator(".jp-Launcher-sectionTitle", has_text="Twarga Lab")
        )
        section.locator(".jp-LauncherCard", has_text="Dashboard").click()
        notebook = page.locator(".jp-NotebookPanel:visible")
        expect(notebook).to_be_visible()
        expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(
            1, timeout=SLOW
        )
        # The kernel's channels can take seconds to connect on two busy cores.
        expect(page.locator(".jp-StatusBar-Widget", has_text="| Idle")).to_be_visible(timeout=SLOW)
        # The toolbar's "restart the kernel and run all cells" (it asks to confirm).
        notebook.locator('[data-command="notebook:restart-run-all"]').click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        output = notebook.locator(".jp-OutputArea-output")
        expect(output.locator(".widget-box").first).to_be_visible(timeout=SLOW)
        expect(output.locator("text=web-1").first).to_be_visible(timeout=SLOW)
        expect(output.locator(".bqplot svg, svg.svg-figure").first).to_be_visible(timeout=SLOW)
        shot(page, "06-dashboard")
        # Minutes after JupyterLab opened: the news question never came.
        expect(page.get_by_text("official Jupyter news")).to_have_count(0)
    finally:
        shot(page, "99-last")
        user.close()
