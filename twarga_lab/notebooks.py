"""The dashboard notebooks that ship with the package, and their installation into a user's
Jupyter root, where the JupyterLab launcher opens them (``twarga-lab/<Name>.ipynb``).

The canonical copies live in ``twarga_lab/notebook_templates/``; the repository's
``notebooks/`` folder holds the same files (a test checks they are identical).
"""

from __future__ import annotations

import os
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "notebook_templates"
FOLDER = "twarga-lab"


def notebook_templates() -> list[Path]:
    """The shipped notebooks, by name."""
    return sorted(TEMPLATES.glob("*.ipynb"))


def install_notebooks(dest: Path, overwrite: bool = False) -> list[Path]:
    """Copy the notebooks into ``dest/twarga-lab/``; returns the files written.

    A notebook already there is the user's (they may have changed it): it is kept unless
    ``overwrite`` is true. A notebook path that is a symbolic link is never written
    through (``O_NOFOLLOW``); under the Hub this runs as the user's own account anyway
    (:func:`twarga_lab.hub.spawn.prepare_user_home`), never as root.
    """
    folder = Path(dest).expanduser() / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for template in notebook_templates():
        target = folder / template.name
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_TRUNC if overwrite else os.O_EXCL
        try:
            fd = os.open(target, flags, 0o644)
        except FileExistsError:
            continue  # the user's copy (or a link of theirs): left alone
        with os.fdopen(fd, "wb") as out:
            out.write(template.read_bytes())
        written.append(target)
    return written
