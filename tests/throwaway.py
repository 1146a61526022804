"""Throwaway unprivileged accounts for attacks done for real (``runuser -u NAME -- ...``).

Every Hub user runs code on the host as their own account; these accounts stand for such a
tenant: no home, no shell, no groups, removed afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

PYTHON = "/usr/bin/python3"  # the system's: readable by every account, unlike the venv


@contextmanager
def throwaway_user() -> Iterator[str]:
    """A new system account (``twx<hex>``), deleted on exit."""
    name = f"twx{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield name
    finally:
        # userdel refuses while a process of the account still runs: the tests' own
        # processes end by themselves, so wait for them (bounded).
        deadline = time.monotonic() + 30
        while subprocess.run(["userdel", name], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or not _exists(name):
                break
            time.sleep(0.2)


def _exists(name: str) -> bool:
    return subprocess.run(["id", "-u", name], capture_output=True).returncode == 0


async def run_as(user: str, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run ``argv`` as ``user`` without blocking the event loop: (exit code, output)."""
    proc = await asyncio.create_subprocess_exec(
        "runuser", "-u", user, "--", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def python_as(user: str, code: str) -> str:
    """Run a Python snippet as ``user``; its output, or AssertionError if it failed."""
    code_, out = await run_as(user, PYTHON, "-c", code)
    assert code_ == 0, out
    return out
