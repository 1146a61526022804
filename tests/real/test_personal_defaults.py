"""Personal mode as a newcomer meets it: ``jupyter server`` started from the repository's
root with no Twarga setting at all (``vms_dir`` is the relative ``./vms``), and a client
written against the seed's API (Twarga Cloud's create body and metric names)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import libvirt
import pytest

from tests.conftest import REPO
from tests.helpers import free_port
from tests.real.conftest import stop_process, wait_until_serving
from twarga_lab.client import Lab

pytestmark = pytest.mark.real

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def default_server():
    """``jupyter server`` in the repository's root with only a port and a token."""
    if not (REPO / "vms" / "images" / "twarga" / "tiny" / "image.json").exists():
        pytest.fail("no ./vms/images/twarga/tiny: run `make image` (make test does)")
    token = secrets.token_hex(16)
    port = free_port()
    log = REPO / "test-artifacts" / "personal-defaults.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Nothing of the test run's own configuration: no TWARGA_* variable reaches it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWARGA_")}
    env["JUPYTER_RUNTIME_DIR"] = str(REPO / "vms" / "test-runs" / f"runtime-{token[:6]}")
    argv = [
        str(VENV_BIN / "jupyter"), "server", "--no-browser", "--allow-root",
        "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(proc, url, token, log)
        yield url, token
    finally:
        stop_process(proc)


def test_defaults_from_the_repo_root_boot_a_vm_with_a_seed_client(default_server):
    url, token = default_server
    seed = httpx.Client(
        base_url=url + "twarga/api/", headers={"Authorization": f"token {token}"}, timeout=60
    )
    me = seed.get("me").json()
    assert me["admin"] is True  # the one person of personal mode
    # JupyterLab here never asks about Jupyter news: the plugin that asks is off.
    lab_page = httpx.get(url + "lab", headers={"Authorization": f"token {token}"}, timeout=60)
    assert lab_page.status_code == 200
    page_config = re.search(r'id="jupyter-config-data"[^>]*>(.*?)</script>', lab_page.text, re.S)
    assert page_config, lab_page.text[:500]
    disabled = json.loads(page_config.group(1))["disabledExtensions"]
    assert "@jupyterlab/apputils-extension:announcements" in disabled
    name = f"newcomer-{secrets.token_hex(3)}"
    # Twarga Cloud's body, as its clients send it.
    created = seed.post(
        "vms", json={"name": name, "os_type": "twarga/tiny", "ram": 512, "cpu": 1, "disk": 10}
    )
    assert created.status_code == 201, created.text
    vm_id = created.json()["id"]
    assert created.json()["os_type"] == "twarga/tiny"
    try:
        vm = Lab(url, token).vms[vm_id]
        vm.wait("running", timeout=120, progress=False)
        assert vm.status_message in (None, ""), vm.status_message
        # The disk lives under the repository's ./vms, reached by an absolute path.
        disk = REPO / "vms" / "instances" / vm.domain / "disk.qcow2"
        info = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert str(REPO / "vms" / "images" / "twarga" / "tiny") in info
        assert vm.run("echo $((6*7))", timeout=90) == "42"
        # The seed's metric vocabulary on the same server.
        history = seed.get(
            "metrics/history", params={"vm_id": vm_id, "metric_type": "cpu", "hours": 1}
        )
        assert history.status_code == 200, history.text
        assert history.json()["metric"] == "cpu_usage"
        network = seed.get("metrics/history", params={"metric": "network", "entity": "host"})
        assert set(network.json()["series"]) == {"net_sent_bytes_per_s", "net_recv_bytes_per_s"}
    finally:
        assert seed.delete(f"vms/{vm_id}").status_code in (204, 404)
    conn = libvirt.open("qemu:///system")
    try:
        deadline = time.monotonic() + 60
        while vm.domain in conn.listDefinedDomains() or vm.domain in [
            d.name() for d in conn.listAllDomains()
        ]:
            assert time.monotonic() < deadline, f"{vm.domain} still defined"
            time.sleep(0.2)
    finally:
        conn.close()
