"""A second, independent system libvirtd on this machine: a hypervisor "host" of its own
for the multi-host tests.

It runs in a private mount namespace where libvirt's own folders (/etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt) are folders of its
own, so it has its own domains, state and sockets (and its own virtlogd), and it is
reached from outside the namespace through its socket:
``qemu+unix:///system?socket=<root>/run/libvirt-sock``. Like a remote host reached over
``qemu+ssh://``, it shares nothing with the first daemon but the machine; unlike one, it
sees the same VM folder (hosts of one shared filesystem).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import libvirt

LIBVIRT_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}


class SecondLibvirtd:
    """Start, kill -9 and restart a libvirtd with state of its own under ``root``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="twarga-h2-"))
        self.root.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "libvirtd.log"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    def prepare(self) -> None:
        """Its own folders; its configuration is the machine's, without the first
        daemon's domains and networks (a network would want a host bridge)."""
        for name in LIBVIRT_DIRS:
            (self.root / name).mkdir(exist_ok=True)
        shutil.copytree("/etc/libvirt", self.root / "etc", dirs_exist_ok=True)
        qemu = self.root / "etc" / "qemu"
        for stale in [*qemu.glob("*.xml"), *(qemu / "networks").rglob("*.xml")]:
            stale.unlink()

    def start(self, timeout: float = 30) -> None:
        """Start its libvirtd (and, the first time, its virtlogd); wait until it answers."""
        mounts = " && ".join(
            f"mount --bind {self.root / name} {target}" for name, target in LIBVIRT_DIRS.items()
        )
        virtlogd = self.root / "virtlogd.pid"
        script = (
            f"{mounts} && "
            f"{{ [ -e {self.root / 'run' / 'virtlogd-sock'} ] || virtlogd -d -p {virtlogd}; }} && "
            f"exec libvirtd -p {self.root / 'libvirtd.pid'}"
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            with contextlib.suppress(libvirt.libvirtError):
                conn = libvirt.open(self.uri)
                conn.close()
                return
            assert time.monotonic() < deadline, "the second libvirtd did not answer"
            time.sleep(0.2)

    def kill(self) -> None:
        """kill -9 its libvirtd (its guests' QEMU processes live on, as they do when a
        host's libvirtd dies)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        (self.root / "libvirtd.pid").unlink(missing_ok=True)

    def domains(self, prefix: str) -> set[str]:
        """Names of its domains that start with ``prefix``."""
        conn = libvirt.open(self.uri)
        try:
            return {d.name() for d in conn.listAllDomains() if d.name().startswith(prefix)}
        finally:
            conn.close()

    def stop(self, prefix: str) -> None:
        """Remove its domains with ``prefix``, stop its daemons, remove its folders."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(libvirt.libvirtError):
                conn = libvirt.open(self.uri)
                for dom in conn.listAllDomains():
                    if dom.name().startswith(prefix):
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.destroy()
                        with contextlib.suppress(libvirt.libvirtError):
                            dom.undefine()
                conn.close()
            self.kill()
        for pid_file in (self.root / "virtlogd.pid", self.root / "libvirtd.pid"):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
