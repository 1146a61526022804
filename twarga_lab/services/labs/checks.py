"""A lab's checks: commands run in its VMs over SSH, their output compared with the
template's expectations.

The service logs in with the lab's own key (``check_key``, made when the lab is made and put
in each of its VMs' seeds next to the owner's key) through the VM's forward on 127.0.0.1,
and trusts only the host key it made for that VM: a program squatting the port cannot
pose as the guest. OpenSSH's client does the work (Debian's ``openssh-client``).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twarga_lab.errors import BackendError

#: What a check may print back, at most (the rest is cut, with a note).
MAX_OUTPUT = 4096


@dataclass(frozen=True)
class CheckTarget:
    """Where one check runs: a VM's SSH forward, its user and its expected host key."""

    machine: str
    vm_id: int | None
    port: int | None
    user: str
    host_key: str | None
    running: bool


@dataclass(frozen=True)
class CheckOutcome:
    """What one check found, as the API reports it."""

    check: str
    machine: str
    passed: bool
    points: float
    score: float
    exit_code: int | None
    output: str
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "machine": self.machine,
            "passed": self.passed,
            "points": self.points,
            "score": self.score,
            "exit_code": self.exit_code,
            "output": self.output,
            "error": self.error,
        }


def make_check_key(folder: Path) -> str:
    """A new ed25519 key pair ``check_key``/``check_key.pub`` in ``folder`` (0700, the
    private half 0600); returns the public line."""
    tool = shutil.which("ssh-keygen")
    if tool is None:
        raise BackendError("ssh-keygen is missing: install Debian's openssh-client")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    key = folder / "check_key"
    key.unlink(missing_ok=True)
    (folder / "check_key.pub").unlink(missing_ok=True)
    try:
        subprocess.run(
            [tool, "-q", "-t", "ed25519", "-N", "", "-C", "twarga-lab-checks", "-f", str(key)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    except subprocess.CalledProcessError as e:
        raise BackendError(f"ssh-keygen failed: {e.stderr!r}") from e
    key.chmod(0o600)
    return (folder / "check_key.pub").read_text().strip()


def _clip(text: str) -> str:
    if len(text) <= MAX_OUTPUT:
        return text
    return text[:MAX_OUTPUT] + f"\n[... {len(text) - MAX_OUTPUT} more characters]"


async def run_check(
    check: Any, target: CheckTarget, key: Path, timeout: float | None = None
) -> CheckOutcome:
    """Run one template check (``name, machine, run, expect, exit_code, points, timeout``)
    on ``target`` and grade it."""

    def outcome(
        passed: bool, exit_code: int | None, output: str, error: str | None
    ) -> CheckOutcome:
        points = float(check.points)
        return CheckOutcome(
            check=check.name, machine=check.machine, passed=passed, points=points,
            score=points if passed else 0.0, exit_code=exit_code, output=_clip(output),
            error=error,
        )  # fmt: skip

    if not target.running or target.port is None:
        return outcome(False, None, "", f"VM {target.machine} is not running")
    if not target.host_key:
        return outcome(False, None, "", f"the SSH host key of {target.machine} is unknown")
    with tempfile.TemporaryDirectory(prefix="twarga-check-") as tmp:
        known = Path(tmp) / "known_hosts"
        known.write_text(f"[127.0.0.1]:{target.port} {target.host_key}\n")
        argv = [
            "ssh", "-i", str(key), "-p", str(target.port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR", "-F", "/dev/null",
            f"{target.user}@127.0.0.1", "--", check.run,
        ]  # fmt: skip
        limit = timeout if timeout is not None else float(check.timeout)
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), limit)
        except TimeoutError:
            process.kill()
            await process.wait()
            return outcome(False, None, "", f"no answer within {limit:g} s")
    output = out.decode(errors="replace")
    code = process.returncode
    if code == 255:  # ssh's own failure: the command never ran
        return outcome(False, None, output, err.decode(errors="replace").strip() or "ssh failed")
    passed = code == check.exit_code
    if passed and check.expect:
        passed = re.search(check.expect, output, re.MULTILINE) is not None
    return outcome(passed, code, output, None)
