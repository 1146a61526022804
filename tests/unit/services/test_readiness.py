"""twarga_lab.services.vms.readiness: following a console log a test appends to (a banner
in pieces, text from before the boot ignored), status changes starting and ending watches,
the ``ready`` event, a service that starts while VMs run, and the SSH banner probe."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import make_placeholder_image
from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, VMStatus, utcnow
from twarga_lab.services.users import UserService
from twarga_lab.services.vms.readiness import (
    BOOT_FILE,
    ConsoleFollower,
    Readiness,
    ssh_banner,
)
from twarga_lab.virt.images import TINY_READY_BANNER, ImageStore

BANNER = re.compile(TINY_READY_BANNER)


# -- the follower on its own ---------------------------------------------------------------


def test_a_banner_written_in_pieces_is_found_once_whole(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")
    follower = ConsoleFollower(log, 0, BANNER)
    assert not follower.poll()
    for piece in (b"booting...\r\nTwarga La", b"b VM web-1 is", b" u"):
        with log.open("ab") as f:
            f.write(piece)
        assert not follower.poll(), piece
    with log.open("ab") as f:
        f.write(b"p\r\n~ # ")
    assert follower.poll()


def test_text_before_the_start_offset_does_not_count(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"Twarga Lab VM web-1 is up\r\npoweroff\r\n")
    follower = ConsoleFollower(log, log.stat().st_size, BANNER)
    assert not follower.poll()
    with log.open("ab") as f:
        f.write(b"[    0.000000] Linux version 6.1\r\nTwarga Lab VM web-1 is upset\r\n")
    assert not follower.poll()  # a whole line must match
    with log.open("ab") as f:
        f.write(b"Twarga Lab VM web-1 is up\r\n")
    assert follower.poll()


def test_a_missing_log_is_waited_for_and_a_replaced_one_read_from_its_start(
    tmp_path: Path,
) -> None:
    log = tmp_path / "console.log"
    follower = ConsoleFollower(log, 0, BANNER)
    assert not follower.poll()
    log.write_bytes(b"x" * 100)
    follower = ConsoleFollower(log, 100, BANNER)
    log.write_bytes(b"Twarga Lab VM a is up\n")  # shorter than the offset: a new file
    assert follower.poll()


def test_a_broken_utf8_sequence_does_not_stop_the_search(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"\xff\xfe\xe2\x82\nCloud-init v. 22.4.2 finished at Wed, 02 Dec\n")
    assert ConsoleFollower(log, 0, re.compile(r"Cloud-init v\. \S+ finished at ")).poll()


# -- the watcher with a database -----------------------------------------------------------


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        images = tmp_path / "images"
        make_placeholder_image(images)  # twarga/tiny without a banner
        banner = make_placeholder_image(images, "test/banner")
        meta = json.loads((banner / "image.json").read_text())
        meta["ready_banner"] = TINY_READY_BANNER
        (banner / "image.json").write_text(json.dumps(meta))
        self.db = Database(f"sqlite:///{tmp_path / 'twarga.db'}").open()
        self.users = UserService(self.db, starting_credits=100.0)
        self.instances = tmp_path / "instances"
        self.readiness = Readiness(
            self.db, ImageStore(images), lambda d: self.instances / d,
            poll=0.02, check_every=0.1, probe_every=0.05,
        )  # fmt: skip

    def add_vm(
        self, name: str = "web", image: str = "test/banner", ssh_port: int | None = None
    ) -> int:
        owner = self.users.ensure("alice")
        with self.db.session() as session:
            vm = VM(owner_id=owner, name=name, image=image, os_type="linux", ram_mb=512, cpu=1,
                    disk_gb=1, status=VMStatus.stopped, domain_name=f"t-{name}",
                    ssh_port=ssh_port)  # fmt: skip
            session.add(vm)
            session.flush()
            (self.instances / vm.domain_name).mkdir(parents=True)
            return vm.id

    def log(self, vm_id: int) -> Path:
        return self.instances / self.vm(vm_id).domain_name / "console.log"  # type: ignore[operator]

    def append(self, vm_id: int, text: str) -> None:
        with self.log(vm_id).open("a") as f:
            f.write(text)

    def vm(self, vm_id: int) -> VM:
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            session.expunge(vm)
            return vm

    def set_status(self, vm_id: int, status: VMStatus, action: str = "start") -> None:
        """What StatusBook.set_status does, in a worker thread like it."""
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            assert vm is not None
            previous = vm.status
            if status is VMStatus.running:
                vm.started_at = utcnow()
            vm.status = status
            self.readiness.status_changed(vm, previous, action)

    async def to(self, vm_id: int, status: VMStatus, action: str = "start") -> None:
        await asyncio.to_thread(self.set_status, vm_id, status, action)

    def ready(self, vm_id: int) -> bool:
        return self.readiness.is_ready(self.vm(vm_id))

    def ready_events(self, vm_id: int) -> list[Event]:
        with self.db.session() as session:
            rows = session.scalars(select(Event).where(Event.vm_id == vm_id)).all()
            session.expunge_all()
        return [e for e in rows if e.details.get("action") == "ready"]


@pytest.fixture
def s(tmp_path: Path) -> Iterator[Setup]:
    setup = Setup(tmp_path)
    yield setup
    setup.db.dispose()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_vm_is_ready_once_its_banner_follows_the_boot(s: Setup) -> None:
    s.readiness.attach(asyncio.get_running_loop())
    vm_id = s.add_vm()
    s.append(vm_id, "Twarga Lab VM web is up\r\n")  # an earlier boot's
    await s.to(vm_id, VMStatus.running)
    boot = s.readiness._boots[vm_id]
    assert json.loads((s.log(vm_id).parent / BOOT_FILE).read_text())["offset"] == 25
    await asyncio.sleep(0.2)
    assert not s.ready(vm_id)
    s.append(vm_id, "Twarga Lab VM web is")
    await asyncio.sleep(0.1)
    assert not s.ready(vm_id)
    s.append(vm_id, " up\r\n")
    await until(lambda: s.ready(vm_id))
    await until(lambda: boot.task is None)
    (event,) = s.ready_events(vm_id)
    assert event.type == "vm" and event.severity == "info"
    assert event.message.startswith("VM web is ready (console banner, ")
    assert 0.2 < event.details["ready_seconds"] < 5
    assert event.details["detail"] == "console banner (boot)"


async def test_stop_cancels_the_watch_and_ready_resets_at_each_running_period(s: Setup) -> None:
    s.readiness.attach(asyncio.get_running_loop())
    vm_id = s.add_vm()
    await s.to(vm_id, VMStatus.running)
    task = s.readiness._boots[vm_id].task
    assert task is not None
    await s.to(vm_id, VMStatus.stopping, "stop")
    await until(task.done)
    assert task.cancelled()
    s.append(vm_id, "Twarga Lab VM web is up\n")
    await s.to(vm_id, VMStatus.stopped, "stop")
    await asyncio.sleep(0.1)
    assert not s.ready(vm_id) and s.ready_events(vm_id) == []
    assert vm_id not in s.readiness._boots

    await s.to(vm_id, VMStatus.running, "start")
    s.append(vm_id, "Twarga Lab VM web is up\n")
    await until(lambda: s.ready(vm_id))
    await s.to(vm_id, VMStatus.stopping, "restart")
    assert not s.ready(vm_id)
    await s.to(vm_id, VMStatus.stopped, "restart")
    await s.to(vm_id, VMStatus.running, "restart")
    await asyncio.sleep(0.1)
    assert not s.ready(vm_id)  # the last boot's banner is before this one's start
    s.append(vm_id, "Twarga Lab VM web is up\n")
    await until(lambda: s.ready(vm_id))
    assert len(s.ready_events(vm_id)) == 2


async def test_a_destroyed_vm_is_dropped_without_a_status_hook(s: Setup) -> None:
    s.readiness.attach(asyncio.get_running_loop())
    vm_id = s.add_vm()
    await s.to(vm_id, VMStatus.running)
    task = s.readiness._boots[vm_id].task
    assert task is not None
    with s.db.session() as session:  # what Lifecycle.destroy does: no status_changed
        row = session.get(VM, vm_id)
        assert row is not None
        row.status = VMStatus.destroyed
    await until(task.done)
    assert vm_id not in s.readiness._boots


async def test_an_image_without_a_banner_is_ready_when_running(s: Setup) -> None:
    s.readiness.attach(asyncio.get_running_loop())
    vm_id = s.add_vm(image="twarga/tiny")
    assert not s.ready(vm_id)
    await s.to(vm_id, VMStatus.running)
    assert s.ready(vm_id)
    assert vm_id not in s.readiness._boots  # nothing to follow
    await s.to(vm_id, VMStatus.paused, "reconcile")
    assert not s.ready(vm_id)


async def test_a_restarted_service_finds_the_banner_of_the_current_boot(s: Setup) -> None:
    vm_id = s.add_vm()
    s.append(vm_id, "Twarga Lab VM web is up\n")
    s.set_status(vm_id, VMStatus.running)  # seen by a service that has not started
    s.append(vm_id, "Twarga Lab VM web is up\n")
    fresh = Readiness(s.db, s.readiness.images, s.readiness.instance_dir, poll=0.02)
    assert await fresh.recover() == 1
    await until(lambda: fresh.is_ready(s.vm(vm_id)))
    (event,) = s.ready_events(vm_id)
    assert event.details["detail"] == "console banner (found at service start)"
    assert "ready_seconds" not in event.details
    again = Readiness(s.db, s.readiness.images, s.readiness.instance_dir, poll=0.02)
    assert await again.recover() == 1
    await until(lambda: again.is_ready(s.vm(vm_id)))
    assert len(s.ready_events(vm_id)) == 1  # said once per boot
    await fresh.close()
    await again.close()


async def test_a_restarted_service_without_the_boot_offset_ignores_old_banners(
    s: Setup,
) -> None:
    vm_id = s.add_vm(ssh_port=_closed_port())
    s.set_status(vm_id, VMStatus.running)
    s.append(vm_id, "Twarga Lab VM web is up\n")
    (s.log(vm_id).parent / BOOT_FILE).unlink()
    fresh = Readiness(s.db, s.readiness.images, s.readiness.instance_dir, poll=0.02,
                      probe_every=0.02)  # fmt: skip
    await fresh.recover()
    await asyncio.sleep(0.2)
    assert not fresh.is_ready(s.vm(vm_id))
    s.append(vm_id, "Twarga Lab VM web is up\n")
    await until(lambda: fresh.is_ready(s.vm(vm_id)))
    await fresh.close()


async def test_a_resumed_guest_is_ready_when_its_ssh_server_greets(s: Setup) -> None:
    s.readiness.attach(asyncio.get_running_loop())
    with _tcp_server(b"") as silent:
        vm_id = s.add_vm(ssh_port=silent)
        await s.to(vm_id, VMStatus.paused, "reconcile")
        await s.to(vm_id, VMStatus.running, "reconcile")
        await asyncio.sleep(0.3)  # accepting without a greeting is QEMU's forward, not sshd
        assert not s.ready(vm_id)
    greet = b"SSH-2.0-dropbear\r\n"
    with _tcp_server(greet) as one, _tcp_server(greet) as two, _tcp_server(greet) as three:
        other = s.add_vm("db", ssh_port=one)
        await s.to(other, VMStatus.starting, "snapshot_revert")
        await s.to(other, VMStatus.running, "reconcile")  # libvirt's event came first
        await until(lambda: s.ready(other))
        (event,) = s.ready_events(other)
        assert event.details["detail"] == "SSH server answering (resumed)"

        outside = s.add_vm("ext", ssh_port=two)
        await s.to(outside, VMStatus.running, "reconcile")  # `virsh start` behind our back
        await until(lambda: s.ready(outside))
        (event,) = s.ready_events(outside)
        assert event.details["detail"] == "SSH server answering (outside Twarga)"

        booting = s.add_vm("boot", ssh_port=three)
        await s.to(booting, VMStatus.starting, "start")
        await s.to(booting, VMStatus.running, "reconcile")  # Twarga's own start
        await asyncio.sleep(0.3)
        assert not s.ready(booting)  # a boot waits for its banner, sshd or not
        s.append(booting, "Twarga Lab VM boot is up\n")
        await until(lambda: s.ready(booting))
    await s.readiness.close()


async def test_close_stops_every_watch(s: Setup) -> None:
    s.readiness.attach(asyncio.get_running_loop())
    vm_id = s.add_vm()
    await s.to(vm_id, VMStatus.running)
    task = s.readiness._boots[vm_id].task
    assert task is not None
    await s.readiness.close()
    assert task.done()


def test_the_ssh_probe_needs_the_greeting() -> None:
    with _tcp_server(b"SSH-2.0-OpenSSH_9.2p1\r\n") as port:
        assert ssh_banner(port)
    with _tcp_server(b"HTTP/1.0 200 OK\r\n") as port:
        assert not ssh_banner(port, timeout=0.5)
    with _tcp_server(b"") as port:
        assert not ssh_banner(port, timeout=0.3)
    assert not ssh_banner(_closed_port(), timeout=0.3)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _tcp_server:
    """127.0.0.1:<port> that accepts and sends ``greeting`` (nothing: holds the line)."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        held = []
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            if self.greeting:
                conn.sendall(self.greeting)
            held.append(conn)
        for conn in held:
            conn.close()

    def __enter__(self) -> int:
        self.thread.start()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


async def test_a_started_at_committed_by_a_racing_event_is_taken(s: Setup) -> None:
    """Twarga's change to running and libvirt's event for it can both set ``started_at``;
    the row keeps one of them, and the current watch takes it."""
    s.readiness.attach(asyncio.get_running_loop())
    vm_id = s.add_vm()
    await s.to(vm_id, VMStatus.running)
    with s.db.session() as session:
        row = session.get(VM, vm_id)
        assert row is not None and row.started_at is not None
        row.started_at = row.started_at.replace(
            microsecond=(row.started_at.microsecond + 1) % 10**6
        )
    assert not s.ready(vm_id)
    s.append(vm_id, "Twarga Lab VM web is up\n")
    await until(lambda: s.ready(vm_id))
    recorded = json.loads((s.log(vm_id).parent / BOOT_FILE).read_text())["started_at"]
    assert recorded == s.vm(vm_id).started_at.replace(tzinfo=None).isoformat()  # type: ignore[union-attr]
