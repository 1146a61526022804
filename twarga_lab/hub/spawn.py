"""Hooks around users' servers under the Hub."""

from __future__ import annotations

import asyncio
import os
import pwd
import sys
from typing import Any

# Runs as the user: ``-I`` so nothing from the environment or the user's site steers it.
INSTALL = (
    "import sys\n"
    "from twarga_lab.notebooks import install_notebooks\n"
    "for path in install_notebooks(sys.argv[1]):\n"
    "    print(path)\n"
)
INSTALL_TIMEOUT = 60.0


async def prepare_user_home(spawner: Any) -> None:
    """Before a user's server starts: the Twarga notebooks are in their home.

    Existing copies are kept, so a user's edits survive. The Hub runs as root, and the
    home is the user's to change (``~/twarga-lab`` may be a link to ``/etc``): the copy
    is made by a child process running as the user's own account (their uid, gid and
    groups), so it can write nothing the user could not write themselves, and what it
    writes belongs to them. A failure is logged; the server starts anyway.
    """
    entry = pwd.getpwnam(spawner.user.name)
    env = {
        "HOME": entry.pw_dir,
        "USER": entry.pw_name,
        "LOGNAME": entry.pw_name,
        "PATH": "/usr/bin:/bin",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", INSTALL, entry.pw_dir,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
        cwd="/",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), INSTALL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        spawner.log.warning(
            "Twarga notebooks for %s: gave up after %s s", entry.pw_name, INSTALL_TIMEOUT
        )
        return
    text = output.decode(errors="replace").strip()
    if proc.returncode != 0:
        last = text.splitlines()[-1] if text else f"exit status {proc.returncode}"
        spawner.log.warning("Twarga notebooks not installed for %s: %s", entry.pw_name, last)
    elif text:
        spawner.log.info(
            "Twarga notebooks installed for %s: %s", entry.pw_name, text.replace("\n", ", ")
        )
