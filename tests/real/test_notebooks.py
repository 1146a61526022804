"""Every shipped notebook runs top to bottom, unattended, against a personal-mode Jupyter
server on qemu:///system with a real guest; the Python-API tour boots and destroys a VM.

The kernel finds the server the way a user's kernel does with no arguments to ``Lab()``:
through ``TWARGA_URL`` and ``TWARGA_TOKEN`` in its environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import libvirt
import nbformat
import pytest
from nbclient import NotebookClient

from twarga_lab.notebooks import notebook_templates

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
# Its own SSH forward range: other real tests use 23000-23399.
SSH_PORTS = (23400, 23499)
ORDER = ["Dashboard", "Monitor", "SOC", "Admin", "Python-API"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_domains(prefix: str) -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix``."""
    conn = libvirt.open("qemu:///system")
    removed = []
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
                removed.append(dom.name())
    finally:
        conn.close()
    return removed


class Service:
    """A personal-mode ``jupyter server`` with Twarga Lab, seen from outside."""

    def __init__(self, url: str, token: str, prefix: str, work: Path) -> None:
        self.url, self.token, self.prefix, self.work = url, token, prefix, work
        self.http = httpx.Client(
            base_url=url + "twarga/api/", headers={"Authorization": f"token {token}"}, timeout=30
        )

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(path, params=params)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def service() -> Any:
    images = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
    if not (images / "twarga" / "tiny" / "image.json").exists():
        pytest.fail(f"no twarga/tiny under {images}: run `make image` (make test does)")
    # libvirt's QEMU user must reach the disks: not under pytest's 0700 temporary folders.
    work = REPO / "vms" / "test-runs" / f"notebooks-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    for folder in (work, work.parent):
        folder.chmod(0o755)
    token, port = secrets.token_hex(16), free_port()
    prefix = f"twn{uuid.uuid4().hex[:6]}-"
    argv = [
        str(REPO / ".venv" / "bin" / "jupyter"),
        "server",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={work}",
        "--TwargaLabApp.libvirt_uri=qemu:///system",
        f"--TwargaLabApp.vms_dir={work / 'vms'}",
        f"--TwargaLabApp.images_dir={images}",
        f"--TwargaLabApp.domain_prefix={prefix}",
        f"--TwargaLabApp.ssh_port_min={SSH_PORTS[0]}",
        f"--TwargaLabApp.ssh_port_max={SSH_PORTS[1]}",
        "--TwargaLabApp.syslog_address=127.0.0.1:0",
        "--TwargaLabApp.metrics_interval=2",
    ]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    log = open(work / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)
    svc = Service(f"http://127.0.0.1:{port}/", token, prefix, work)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (work / "server.log").read_text()[-3000:]
            try:
                svc.get("me")
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (work / "server.log").read_text()[-3000:]
                time.sleep(0.2)
        yield svc
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        svc.http.close()
        remove_domains(prefix)
        shutil.rmtree(work, ignore_errors=True)


def execute(service: Service, name: str) -> nbformat.NotebookNode:
    """Run one shipped notebook in a fresh python3 kernel (the venv's); returns it run."""
    template = next(path for path in notebook_templates() if path.stem == name)
    nb = nbformat.read(template, as_version=4)
    run_dir = service.work / "notebooks"
    run_dir.mkdir(exist_ok=True)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(run_dir)}},
    )
    env = {**os.environ, "TWARGA_URL": service.url, "TWARGA_TOKEN": service.token}
    client.execute(env=env)
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, errors
    nbformat.write(nb, run_dir / template.name)  # kept for a look while the run lasts
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or showed as text."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                parts.append(output.text)
            elif "data" in output:
                parts.append(str(output.data.get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", ORDER[:-1])
def test_dashboard_notebooks_run_top_to_bottom(service: Service, name: str) -> None:
    nb = execute(service, name)
    widgets = [
        output
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in output.get("data", {})
    ]
    assert widgets, f"{name} showed no widget"


def test_python_api_tour_boots_runs_and_destroys_a_vm(service: Service) -> None:
    nb = execute(service, "Python-API")
    output = text_of(nb)
    assert "Linux" in output and "x86_64" in output  # uname -a ran inside the guest
    assert "42-is-the-answer" in output  # and the console widget typed into it
    assert "tour-vm" not in [vm["name"] for vm in service.get("vms")]
    events = service.get("soc/events", type="vm", limit=200)
    messages = [e["message"] for e in (events["events"] if isinstance(events, dict) else events)]
    for expected in ("VM tour-vm created", "VM tour-vm is running", "VM tour-vm destroyed"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    conn = libvirt.open("qemu:///system")
    try:
        ours = [d.name() for d in conn.listAllDomains() if d.name().startswith(service.prefix)]
    finally:
        conn.close()
    assert ours == []
