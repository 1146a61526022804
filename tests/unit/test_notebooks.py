"""The dashboard notebooks: shipped in the package, the same as the repository's
``notebooks/``, committed without outputs, and installed where the launcher opens them."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat

from twarga_lab.notebooks import install_notebooks, notebook_templates

REPO = Path(__file__).resolve().parents[2]
NAMES = {
    "Dashboard.ipynb",
    "Monitor.ipynb",
    "SOC.ipynb",
    "Admin.ipynb",
    "Python-API.ipynb",
    "Grading.ipynb",
}
FIRST_CELL = "from twarga_lab.client import Lab\n\nlab = Lab()"


def test_the_package_ships_every_notebook_and_notebooks_holds_the_same_files():
    shipped = {path.name: path.read_bytes() for path in notebook_templates()}
    assert set(shipped) == NAMES
    in_repo = {path.name: path.read_bytes() for path in (REPO / "notebooks").glob("*.ipynb")}
    different = sorted(n for n in NAMES if in_repo.get(n) != shipped[n])
    assert not different, (
        f"notebooks/ and twarga_lab/notebook_templates/ differ in {different}: the package's "
        "copies are canonical (cp twarga_lab/notebook_templates/*.ipynb notebooks/ after "
        "editing them, or the other way round)"
    )


def test_notebooks_are_valid_start_with_lab_and_have_no_outputs():
    for path in notebook_templates():
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        assert code[0].source.startswith(FIRST_CELL), path.name
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, path.name
        assert nb.metadata["kernelspec"]["name"] == "python3"


def test_install_notebooks_copies_into_twarga_lab_and_keeps_the_users_changes(tmp_path):
    written = install_notebooks(tmp_path)
    assert {path.name for path in written} == NAMES
    assert all(path.parent == tmp_path / "twarga-lab" for path in written)
    mine = tmp_path / "twarga-lab" / "Dashboard.ipynb"
    mine.write_text(json.dumps({"edited": True}))
    assert install_notebooks(tmp_path) == []
    assert json.loads(mine.read_text()) == {"edited": True}
    again = install_notebooks(tmp_path, overwrite=True)
    assert {path.name for path in again} == NAMES
    assert "cells" in json.loads(mine.read_text())
