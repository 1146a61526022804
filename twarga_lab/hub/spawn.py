"""Hooks around users' servers under the Hub."""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any


def prepare_user_home(spawner: Any) -> None:
    """Before a user's server starts: the Twarga notebooks are in their home.

    Existing copies are kept, so a user's edits survive; the files belong to the user.
    """
    from twarga_lab.notebooks import install_notebooks

    entry = pwd.getpwnam(spawner.user.name)
    home = Path(entry.pw_dir)
    written = install_notebooks(home)
    for path in [home / "twarga-lab", *written]:
        os.chown(path, entry.pw_uid, entry.pw_gid)
