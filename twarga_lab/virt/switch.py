"""One virtual L2 switch per lab segment: Debian's ``vde_switch`` on a UNIX socket folder.

A segment is a folder holding the switch's ``ctl`` socket (and the data sockets of the
QEMU processes plugged into it, ``-netdev vde,sock=<folder>``). There is no host tap and no
bridge: the only way onto the segment is that folder, which is mode 0700 and owned by the
account QEMU runs as; the switch runs as that account too, so it never holds root.

The switch is daemonised with its pid file inside the folder (``switch.pid``): it outlives
the service that started it, and a restarted service finds it again
(:func:`start_switch` is idempotent). Since QEMU's account can write that pid file, a pid
read from it is only trusted (and signalled) when ``/proc`` shows a ``vde_switch`` of that
account serving this very folder.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from twarga_lab.errors import BackendError
from twarga_lab.virt.images import FileOwner

__all__ = [
    "MAX_FOLDER_BYTES",
    "PID_FILE",
    "VDE_PACKAGE",
    "start_switch",
    "stop_switch",
    "switch_pid",
    "switch_running",
]

VDE_PACKAGE = "vde2"
PID_FILE = "switch.pid"
CTL_SOCKET = "ctl"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: A UNIX socket path has at most 107 bytes; each QEMU plugged in binds its own data socket
#: ``<folder>/.PPPPP-NNNNN`` (libvdeplug's ``%s/.%05d-%05d``; up to 15 bytes after the
#: folder with 7-digit pids).
MAX_FOLDER_BYTES = 107 - 15


def _check_folder(sock_dir: Path) -> Path:
    sock_dir = Path(sock_dir)
    text = str(sock_dir)
    if not sock_dir.is_absolute() or "," in text or "\x00" in text or "\n" in text:
        raise ValueError(f"bad switch folder {text!r}: absolute, without commas")
    return sock_dir


def _proc_matches(pid: int, sock_dir: Path, uid: int | None) -> bool:
    """Whether ``pid`` is a live ``vde_switch`` serving ``sock_dir`` (as ``uid``, if given)."""
    proc = Path("/proc") / str(pid)
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        status = (proc / "status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("State", "").strip().startswith(("Z", "X")):
        return False  # exited; a zombie waits for its parent
    if uid is not None and fields.get("Uid", "").split()[:1] != [str(uid)]:
        return False
    if not argv or os.path.basename(argv[0]) != b"vde_switch":
        return False
    wanted = os.fsencode(str(sock_dir))
    return any(a == b"-s" and b == wanted for a, b in itertools.pairwise(argv))


def switch_pid(sock_dir: Path, *, owner: FileOwner | None = None) -> int | None:
    """The pid of the switch serving ``sock_dir``, or None when none runs there."""
    sock_dir = _check_folder(sock_dir)
    try:
        pid = int((sock_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 1:
        return None
    uid = owner.uid if owner is not None else None
    return pid if _proc_matches(pid, sock_dir, uid) else None


def switch_running(sock_dir: Path) -> bool:
    """Whether a switch serves ``sock_dir`` (its process lives and its ``ctl`` socket is there)."""
    sock_dir = _check_folder(sock_dir)
    return switch_pid(sock_dir) is not None and (sock_dir / CTL_SOCKET).is_socket()


def start_switch(sock_dir: Path, *, owner: FileOwner | None) -> int:
    """Start (or find) the switch of the segment ``sock_dir``; its pid.

    ``owner`` is QEMU's account (:func:`twarga_lab.virt.images.qemu_account`): the folder
    is made 0700 and owned by it, and the switch runs as it. None runs the switch as this
    process's own account (a session libvirt, or tests without root).
    """
    sock_dir = _check_folder(sock_dir)
    if len(os.fsencode(str(sock_dir))) > MAX_FOLDER_BYTES:
        raise ValueError(
            f"switch folder {sock_dir} is too long for its sockets (at most "
            f"{MAX_FOLDER_BYTES} bytes): choose a shorter folder"
        )
    pid = switch_pid(sock_dir, owner=owner)
    if pid is not None and (sock_dir / CTL_SOCKET).is_socket():
        return pid
    if pid is not None:  # alive but without its socket: start again from scratch
        _terminate(pid, sock_dir)
    tool = shutil.which("vde_switch") or (
        "/usr/bin/vde_switch" if Path("/usr/bin/vde_switch").is_file() else None
    )
    if tool is None:
        raise BackendError(f"vde_switch is missing: install the Debian package {VDE_PACKAGE}")
    sock_dir.parent.mkdir(parents=True, exist_ok=True)
    if sock_dir.is_symlink() or (sock_dir.exists() and not sock_dir.is_dir()):
        raise BackendError(f"{sock_dir} exists and is not a folder")
    sock_dir.mkdir(mode=0o700, exist_ok=True)
    # Sockets and the pid file of a switch that died: the new one makes its own.
    for stale in (sock_dir / CTL_SOCKET, sock_dir / PID_FILE):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    sock_dir.chmod(0o700)
    if owner is not None:
        os.chown(sock_dir, owner.uid, owner.gid, follow_symlinks=False)
    argv = [
        tool, "-s", str(sock_dir), "--dirmode", "0700", "-m", "0600",
        "-d", "-p", str(sock_dir / PID_FILE), "-f", "/dev/null",
    ]  # fmt: skip
    extra: dict[str, object] = {}
    if owner is not None and (os.geteuid() != owner.uid):
        extra = {"user": owner.uid, "group": owner.gid, "extra_groups": []}
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            cwd="/",
            start_new_session=True,
            **extra,  # type: ignore[arg-type]
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BackendError(f"vde_switch did not start: {exc}") from exc
    if done.returncode != 0:
        raise BackendError(f"vde_switch failed ({done.returncode}): {done.stderr.strip()}")
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        pid = switch_pid(sock_dir, owner=owner)
        if pid is not None and (sock_dir / CTL_SOCKET).is_socket():
            return pid
        if time.monotonic() >= deadline:
            raise BackendError(f"vde_switch on {sock_dir} did not come up")
        time.sleep(0.05)


def _terminate(pid: int, sock_dir: Path) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _proc_matches(pid, sock_dir, None):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        else:
            return
    raise BackendError(f"vde_switch {pid} on {sock_dir} does not exit")


def stop_switch(sock_dir: Path) -> None:
    """Stop the switch of ``sock_dir`` (if one runs) and remove the folder."""
    sock_dir = _check_folder(sock_dir)
    pid = switch_pid(sock_dir)
    if pid is not None:
        _terminate(pid, sock_dir)
    if sock_dir.is_symlink():
        sock_dir.unlink()
    else:
        shutil.rmtree(sock_dir, ignore_errors=True)
