"""The dashboard notebooks that ship with the package, and their installation into a user's
Jupyter root, where the JupyterLab launcher opens them (``twarga-lab/<Name>.ipynb``).

The canonical copies live in ``twarga_lab/notebook_templates/``; the repository's
``notebooks/`` folder holds the same files (a test checks they are identical).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "notebook_templates"
FOLDER = "twarga-lab"


def notebook_templates() -> list[Path]:
    """The shipped notebooks, by name."""
    return sorted(TEMPLATES.glob("*.ipynb"))


def install_notebooks(dest: Path, overwrite: bool = False) -> list[Path]:
    """Copy the notebooks into ``dest/twarga-lab/``; returns the files written.

    A notebook already there is the user's (they may have changed it): it is kept unless
    ``overwrite`` is true.
    """
    folder = Path(dest).expanduser() / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for template in notebook_templates():
        target = folder / template.name
        if target.exists() and not overwrite:
            continue
        shutil.copyfile(template, target)
        written.append(target)
    return written
