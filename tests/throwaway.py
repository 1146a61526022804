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


def udp_flood(port: int, seconds: float) -> str:
    """Python code sending forged sshd lines to 127.0.0.1:``port`` as fast as it can for
    ``seconds``; it prints how many datagrams went out."""
    return (
        "import socket, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "line = b'<38>Nov 27 08:00:00 x sshd[9]: Failed password for root from "
        "198.51.100.7 port 1 ssh2'\n"
        f"end, n = time.monotonic() + {seconds}, 0\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        s.sendto(line, ('127.0.0.1', {port})); n += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(n)\n"
    )
