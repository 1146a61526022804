"""Whether a running VM has booted: ``"ready"`` in its JSON.

``running`` only says QEMU runs; the guest may still be starting its services. An image
whose ``image.json`` has a ``ready_banner`` (a regular expression, matched line by line)
prints it on its serial console once it is usable: ``twarga/tiny`` its ``Twarga Lab VM
NAME is up`` (after dropbear started), ``debian/12`` cloud-init's final ``Cloud-init v.
... finished at``. Every VM's serial console is appended to
``<vms_dir>/instances/<domain>/console.log``, so when a VM becomes running the watcher
remembers the log's size (only what comes after it is this boot's) and follows the file
until the banner appears; the VM is then ready, and a ``vm`` event with action ``ready``
records the seconds from running to ready.

Where the console cannot tell (a guest resumed from a paused state or a memory snapshot
does not boot again; a VM found running outside Twarga's calls, or by a service that
restarts while VMs run, may have booted long ago), an SSH server answering ``SSH-2.0-...``
on the VM's forwarded port counts too: only the greeting, since QEMU's user-mode forward
accepts TCP before the guest listens.
Each boot's start offset is kept beside the log (``console.boot``), so a restarted service
looks for the banner from there on.

Ready is false whenever the VM is not running, and falls back to false at every new
running period (start, restart, snapshot revert). Images without a banner: ``ready``
equals ``status == "running"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, VMStatus
from twarga_lab.errors import NotFound
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.vms.lifecycle import TRANSITIONAL
from twarga_lab.virt.images import ImageStore

log = logging.getLogger(__name__)

CONSOLE_LOG = "console.log"
BOOT_FILE = "console.boot"  # where this boot's part of console.log starts (JSON)
#: A line longer than this without a newline keeps only its tail.
MAX_PENDING = 64 * 1024
#: How long an image's banner is trusted before image.json is read again.
BANNER_TTL = 30.0


def ssh_banner(port: int, host: str = "127.0.0.1", timeout: float = 1.5) -> bool:
    """Whether an SSH server answers on ``host:port`` (its ``SSH-2.0-`` greeting)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class ConsoleFollower:
    """Reads what is appended to a console log after ``offset`` and looks for ``banner``
    in it, one line at a time (a line may arrive in pieces over several polls)."""

    def __init__(self, path: Path, offset: int, banner: re.Pattern[str]) -> None:
        self.path = path
        self.offset = offset
        self.banner = banner
        self._pending = b""  # the last, unfinished line

    def poll(self) -> bool:
        """Read what was appended since the last poll; True once the banner was seen."""
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < self.offset:
                    # The log was replaced (a VM made again): its start is this boot's.
                    self.offset, self._pending = 0, b""
                if size == self.offset:
                    return False
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except FileNotFoundError:
            return False  # QEMU has not opened it yet
        self.offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()[-MAX_PENDING:]
        return any(self._matches(line) for line in [*lines, self._pending])

    def _matches(self, line: bytes) -> bool:
        text = line.decode("utf-8", "replace").rstrip("\r")
        return self.banner.search(text) is not None


def _key(moment: datetime | None) -> datetime | None:
    """``started_at`` as a comparable value (naive UTC), whatever the database gave."""
    if moment is None:
        return None
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


@dataclass
class Boot:
    """One running period of a VM, from the moment it was seen running."""

    vm_id: int
    domain: str
    started_at: datetime | None  # the row's started_at (naive UTC): which period this is
    log: Path
    offset: int
    banner: re.Pattern[str]
    ssh_port: int | None
    probe_ssh: bool  # the console may never print the banner (resumed, or offset unknown)
    how: str
    since: float = field(default_factory=time.monotonic)
    ready: bool = False
    task: asyncio.Task[None] | None = None


class Readiness:
    """Follows the console of running VMs whose image has a ready banner."""

    def __init__(
        self,
        db: Database,
        images: ImageStore,
        instance_dir: Callable[[str], Path],
        *,
        poll: float = 0.2,
        check_every: float = 2.0,
        probe_every: float = 2.0,
    ) -> None:
        self.db = db
        self.images = images
        self.instance_dir = instance_dir
        self.poll = poll  # seconds between reads of a console log
        self.check_every = check_every  # seconds between checks that the VM still runs
        self.probe_every = probe_every  # seconds between SSH probes, where they count
        self.loop: asyncio.AbstractEventLoop | None = None
        self._boots: dict[int, Boot] = {}
        self._lock = threading.Lock()
        self._banners: dict[str, tuple[float, re.Pattern[str] | None]] = {}
        self._actions: dict[int, str] = {}  # what last moved each VM into a transitional status

    # -- what the views ask ----------------------------------------------------------

    def banner_of(self, image: str) -> re.Pattern[str] | None:
        """The ready banner of ``image`` (None: it has none, or is gone)."""
        now = time.monotonic()
        cached = self._banners.get(image)
        if cached is not None and now - cached[0] < BANNER_TTL:
            return cached[1]
        pattern = None
        try:
            text = self.images.get(image).ready_banner
        except NotFound:
            text = None
        if text:
            try:
                pattern = re.compile(text)
            except re.error as e:
                log.warning("image %s: ready_banner %r is not a regular expression: %s",
                            image, text, e)  # fmt: skip
        self._banners[image] = (now, pattern)
        return pattern

    def is_ready(self, vm: VM) -> bool:
        """Whether ``vm`` is running and its guest reported in (running, for an image
        without a banner)."""
        if vm.status is not VMStatus.running:
            return False
        if self.banner_of(vm.image) is None:
            return True
        boot = self._boots.get(vm.id)
        return boot is not None and boot.ready and boot.started_at == _key(vm.started_at)

    # -- what the status changes tell --------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Follow consoles on ``loop`` from now on."""
        self.loop = loop

    def status_changed(self, vm: VM, previous: VMStatus, action: str) -> None:
        """``vm``'s status just changed from ``previous`` (called in the session of the
        change, from a worker thread): a new running period starts a watch, anything
        else ends the one there was. Never raises."""
        try:
            self._status_changed(vm, previous, action)
        except Exception:
            log.exception("readiness of VM %s", vm.id)

    def _status_changed(self, vm: VM, previous: VMStatus, action: str) -> None:
        self.forget(vm.id)
        # What moved the VM into a transitional status: libvirt's event may then be the
        # change that reaches running (action "reconcile").
        earlier = self._actions.get(vm.id)
        if vm.status in TRANSITIONAL:
            self._actions[vm.id] = action
        if vm.status is not VMStatus.running or vm.domain_name is None:
            return
        banner = self.banner_of(vm.image)
        if banner is None:
            return
        folder = self.instance_dir(vm.domain_name)
        console = folder / CONSOLE_LOG
        # An adopted create (a crash came between the guest's start and its status): its
        # console log was made fresh for this one boot, so the banner may be in it already.
        adopted = action == "adopt"
        offset = 0 if adopted else _size(console)
        # A guest that was paused, or reverted to a memory snapshot, does not boot again.
        reverted = "snapshot_revert" in (action, earlier if previous in TRANSITIONAL else None)
        resumed = previous is VMStatus.paused or reverted
        # Found running outside Twarga's own calls: since when is not known.
        outside = action == "reconcile" and previous not in TRANSITIONAL and not resumed
        how = (
            "resumed" if resumed else "outside Twarga" if outside else "adopted" if adopted
            else "boot"
        )  # fmt: skip
        boot = Boot(
            vm.id, vm.domain_name, _key(vm.started_at), console, offset, banner, vm.ssh_port,
            probe_ssh=resumed or outside or adopted, how=how,
        )  # fmt: skip
        _write_boot_file(folder / BOOT_FILE, offset, boot.started_at)
        self._watch(boot)

    def forget(self, vm_id: int) -> None:
        """Stop watching VM ``vm_id`` (it is not ready any more)."""
        with self._lock:
            boot = self._boots.pop(vm_id, None)
        if boot is not None and boot.task is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(boot.task.cancel)

    def _watch(self, boot: Boot) -> None:
        with self._lock:
            self._boots[boot.vm_id] = boot
        loop = self.loop
        if loop is None:
            return  # not started: recover() picks it up

        def spawn() -> None:
            if self._boots.get(boot.vm_id) is boot and boot.task is None:
                boot.task = loop.create_task(self._follow(boot), name=f"ready VM {boot.vm_id}")

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            spawn()
        else:
            loop.call_soon_threadsafe(spawn)

    # -- start-up and shut-down --------------------------------------------------------

    async def recover(self) -> int:
        """Watch every running VM with a banner that is not watched yet (a service that
        starts while VMs run): from its boot's start in the log when ``console.boot``
        names this running period, else from now on with the SSH probe. Returns how
        many watches started."""
        self.loop = asyncio.get_running_loop()
        boots = await asyncio.to_thread(self._recoverable)
        for boot in boots:
            self._watch(boot)
        return len(boots)

    def _recoverable(self) -> list[Boot]:
        boots = []
        with self.db.session() as session:
            for vm in session.scalars(select(VM).where(VM.status == VMStatus.running)):
                if vm.id in self._boots or vm.domain_name is None:
                    continue
                banner = self.banner_of(vm.image)
                if banner is None:
                    continue
                folder = self.instance_dir(vm.domain_name)
                console = folder / CONSOLE_LOG
                started = _key(vm.started_at)
                offset = _read_boot_file(folder / BOOT_FILE, started)
                size = _size(console)
                known = offset is not None and offset <= size
                boot = Boot(
                    vm.id, vm.domain_name, started, console,
                    offset if known and offset is not None else size,
                    banner, vm.ssh_port, probe_ssh=not known, how="found at service start",
                )  # fmt: skip
                boots.append(boot)
        return boots

    async def close(self) -> None:
        """Stop following every console."""
        with self._lock:
            tasks = [b.task for b in self._boots.values() if b.task is not None]
            self._boots.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    # -- following ---------------------------------------------------------------------

    async def _follow(self, boot: Boot) -> None:
        follower = ConsoleFollower(boot.log, boot.offset, boot.banner)
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.check_every
        next_probe = loop.time()
        how: str | None = None  # how the guest reported in, once it did
        try:
            while self._boots.get(boot.vm_id) is boot:
                # A small local read: cheaper inline than a hop to a worker thread.
                if how is None and follower.poll():
                    how = "console banner"
                if how is None and boot.probe_ssh and boot.ssh_port and loop.time() >= next_probe:
                    if await asyncio.to_thread(ssh_banner, boot.ssh_port):
                        how = "SSH server answering"
                    next_probe = loop.time() + self.probe_every
                # False while the change to running is not committed yet: try again.
                if how is not None and await asyncio.to_thread(self._mark_ready, boot, how):
                    return
                if loop.time() >= next_check:
                    # Destroys and other changes that bypass the status hooks.
                    if not await asyncio.to_thread(self._still_running, boot):
                        self._drop(boot)
                        return
                    next_check = loop.time() + self.check_every
                await asyncio.sleep(self.poll)
        finally:
            boot.task = None

    def _drop(self, boot: Boot) -> None:
        with self._lock:
            if self._boots.get(boot.vm_id) is boot:
                del self._boots[boot.vm_id]

    def _still_running(self, boot: Boot) -> bool:
        with self.db.session() as session:
            vm = session.get(VM, boot.vm_id)
            return vm is not None and vm.status is VMStatus.running and self._adopt(boot, vm)

    def _adopt(self, boot: Boot, vm: VM) -> bool:
        """Whether running ``vm`` is in ``boot``'s running period. Every change of status
        replaces the boot, so a current one is; but a libvirt event applied at the same
        time as Twarga's own change can commit another ``started_at`` than the one the
        boot was told: the row's is taken."""
        if self._boots.get(vm.id) is not boot:
            return False
        started = _key(vm.started_at)
        if started != boot.started_at:
            boot.started_at = started
            _write_boot_file(boot.log.parent / BOOT_FILE, boot.offset, started)
        return True

    def _mark_ready(self, boot: Boot, how: str) -> bool:
        """Mark ``boot`` ready (with its event); False if its row does not show this
        running period (yet)."""
        seconds = time.monotonic() - boot.since
        with self.db.session() as session:
            vm = session.get(VM, boot.vm_id)
            if self._boots.get(boot.vm_id) is not boot:
                return True  # a newer running period, or none: nothing to mark
            if vm is None or vm.status is not VMStatus.running or not self._adopt(boot, vm):
                return False
            boot.ready = True
            details: dict[str, object] = {"detail": f"{how} ({boot.how})"}
            recovered = boot.how == "found at service start"
            if recovered and self._ready_recorded(session, vm):
                return True  # the service that stopped said so already
            if not recovered:
                details["ready_seconds"] = round(seconds, 2)
            text = f"VM {vm.name} is ready ({how}"
            text += f", {seconds:.1f} s after running)" if not recovered else ")"
            record_event(
                session, EventType.vm, Severity.info, text,
                user_name=vm.owner.name, vm_id=vm.id, action="ready", **details,
            )  # fmt: skip
        log.info("VM %s is ready after %.1f s (%s)", boot.vm_id, seconds, how)
        return True

    @staticmethod
    def _ready_recorded(session: Session, vm: VM) -> bool:
        """Whether a ``ready`` event of ``vm``'s current running period exists."""
        stmt = select(Event.id).where(
            Event.vm_id == vm.id, Event.details["action"].as_string() == "ready"
        )
        if vm.started_at is not None:
            stmt = stmt.where(Event.created_at >= vm.started_at)
        return session.scalar(stmt.limit(1)) is not None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _write_boot_file(path: Path, offset: int, started_at: datetime | None) -> None:
    data = {"offset": offset, "started_at": started_at.isoformat() if started_at else None}
    partial = path.with_name(f".{path.name}.tmp")
    try:
        partial.write_text(json.dumps(data))
        partial.chmod(0o600)
        os.replace(partial, path)
    except OSError as e:  # no instance folder (yet): a restart falls back to the SSH probe
        log.debug("cannot write %s: %s", path, e)


def _read_boot_file(path: Path, started_at: datetime | None) -> int | None:
    """The offset ``console.boot`` records, if it is about running period ``started_at``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("offset"), int):
        return None
    recorded = data.get("started_at")
    if started_at is None or recorded != started_at.isoformat():
        return None
    return int(data["offset"])
