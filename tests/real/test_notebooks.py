"""Every shipped notebook runs top to bottom, unattended, against a personal-mode Jupyter
server on qemu:///system with a real guest; the Python-API tour boots and destroys a VM.

The kernel finds the server the way a user's kernel does with no arguments to ``Lab()``:
through ``TWARGA_URL`` and ``TWARGA_TOKEN`` in its environment.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import httpx
import libvirt
import nbformat
import pytest
from nbclient import NotebookClient

from tests.real.conftest import running_server
from twarga_lab.notebooks import notebook_templates

pytestmark = [pytest.mark.real, pytest.mark.timeout(900)]

# Its own SSH forward range: other real tests use 23000-23399.
SSH_PORTS = (23400, 23499)
ORDER = ["Dashboard", "Monitor", "SOC", "Admin", "Python-API"]


@pytest.fixture(scope="module")
def service() -> Any:
    """The server, and an admin's token for the kernels (the Admin notebook needs one)."""
    with running_server(SSH_PORTS[0], "--TwargaLabApp.metrics_interval=2") as server:
        http = httpx.Client(
            base_url=server.url + "twarga/api/",
            timeout=30,
            headers={"Authorization": "token admin-token"},
        )
        yield SimpleNamespace(
            url=server.url,
            token="admin-token",
            prefix=server.prefix,
            work=server.work,
            get=lambda path, **params: _json(http.get(path, params=params)),
        )
        http.close()


def _json(response: httpx.Response) -> Any:
    response.raise_for_status()
    return response.json()


def execute(service: Any, name: str) -> nbformat.NotebookNode:
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
def test_dashboard_notebooks_run_top_to_bottom(service: Any, name: str) -> None:
    nb = execute(service, name)
    widgets = [
        output
        for cell in nb.cells
        for output in cell.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in output.get("data", {})
    ]
    assert widgets, f"{name} showed no widget"


def test_python_api_tour_boots_runs_and_destroys_a_vm(service: Any) -> None:
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
