"""The teacher's Grading notebook, run headless with nbclient against the fake labs API
(``tests/unit/labs_fake.py``): the kernel finds the service through ``TWARGA_URL`` and
``TWARGA_TOKEN`` as a user's kernel does, the parameters come in papermill's way (a cell
after the one tagged ``parameters``), and the run leaves a grade table and a chart."""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from tests.unit.labs_fake import FakeTwarga
from twarga_lab.notebooks import install_notebooks, notebook_templates

pytestmark = pytest.mark.timeout(180)

SVG = "{http://www.w3.org/2000/svg}"
STUDENTS = ["alice", "bob", "carol"]


def grading() -> nbformat.NotebookNode:
    path = next(p for p in notebook_templates() if p.name == "Grading.ipynb")
    return nbformat.read(path, as_version=4)


def run(nb: nbformat.NotebookNode, work: Path, env: dict[str, str], **params: Any) -> None:
    """Run ``nb`` in the venv's python3 kernel with ``params`` injected after its
    ``parameters`` cell (as papermill does); fails on any cell's error."""
    if params:
        at = next(
            i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])
        )
        source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
        injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(at + 1, injected)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(work)}}
    )
    client.execute(env=env)
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, errors


def kernel_env(fake: FakeTwarga, user: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWARGA_", "JUPYTERHUB_"))}
    return {**env, "TWARGA_URL": fake.url, "TWARGA_TOKEN": fake.token(user)}


@pytest.fixture
def course() -> Any:
    """A deployment of attack-defend to three students, all labs running, graded unequally."""
    from twarga_lab.client import Lab

    with FakeTwarga(boot_seconds=0.0) as fake:
        teacher = Lab(fake.url, fake.token("teacher"), timeout=10)
        deployment = teacher.deploy("attack-defend", "sec101", "tp1")
        deployment.wait("running", timeout=10, poll=0.05)
        fake.solved["alice"] = {"attacker reaches target", "target is hardened"}
        fake.solved["bob"] = {"attacker reaches target"}
        yield fake, deployment
        teacher._http.close()


def text_outputs(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


def test_the_notebook_is_shipped_and_installed_with_a_parameters_cell(tmp_path):
    nb = grading()
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "deployment_id = None" in tagged[0].source
    assert 'output_dir = "grades"' in tagged[0].source
    installed = {p.name for p in install_notebooks(tmp_path)}
    assert "Grading.ipynb" in installed


def test_grading_a_deployment_writes_one_row_per_student_and_a_chart(course, tmp_path):
    fake, deployment = course
    out = tmp_path / "report"
    nb = grading()
    run(nb, tmp_path, kernel_env(fake, "teacher"), deployment_id=deployment.id, output_dir=str(out))

    with (out / "grades.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["student", "lab_id", "score", "max_score", "grade"]
    assert [r["student"] for r in rows] == STUDENTS
    assert [float(r["grade"]) for r in rows] == [100.0, 33.3, 0.0]
    assert [float(r["max_score"]) for r in rows] == [3.0, 3.0, 3.0]
    assert {int(r["lab_id"]) for r in rows} == {lab.id for lab in deployment.labs}
    # The checks really ran: once per student lab, from the kernel.
    checked = [p for u, m, p in fake.requests if p == f"deployments/{deployment.id}/check"]
    assert len(checked) == 1

    svg = ET.parse(out / "grades.svg").getroot()
    assert svg.tag == f"{SVG}svg"
    bars = [r for r in svg.iter(f"{SVG}rect") if r.get("class") == "grade"]
    assert len(bars) == 3
    heights = [float(b.get("height")) for b in bars]
    assert heights[0] > heights[1] > heights[2] == 0.0
    names = [t.text for t in svg.iter(f"{SVG}text") if t.get("class") == "student"]
    assert names == STUDENTS

    # The run notebook is the report: the table and the chart are in its outputs.
    shown = text_outputs(nb)
    assert all(student in shown for student in STUDENTS)
    outputs = [out for cell in nb.cells for out in cell.get("outputs", [])]
    assert any("image/svg+xml" in out.get("data", {}) for out in outputs)
    assert "3 students" in shown


def test_without_a_deployment_id_it_grades_the_newest_deployment(course, tmp_path):
    fake, deployment = course
    from twarga_lab.client import Lab

    newer = Lab(fake.url, fake.token("teacher")).deploy("attack-defend", "sec101", "tp2")
    env = {**kernel_env(fake, "teacher"), "TWARGA_GRADES_DIR": str(tmp_path / "env-out")}
    run(grading(), tmp_path, env)
    with (tmp_path / "env-out" / "grades.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["student"] for r in rows] == STUDENTS
    assert {int(r["lab_id"]) for r in rows} == {lab.id for lab in newer.labs}
    checked = {p for u, m, p in fake.requests if p.endswith("/check")}
    assert checked == {f"deployments/{newer.id}/check"} != {f"deployments/{deployment.id}/check"}
    assert (tmp_path / "env-out" / "grades.svg").stat().st_size > 0
