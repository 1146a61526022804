"""Console sessions: output held until the banner, UTF-8 across reads, one session per VM
(a new one takes over), back-pressure on the guest's output, idle culling and shutdown;
the service refuses a stopped VM and records who opened a console."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from twarga_lab.db import Database
from twarga_lab.db.models import VM, Event, User, VMStatus
from twarga_lab.errors import Conflict, NotFound
from twarga_lab.services import Identity
from twarga_lab.services.consoles import (
    ConsoleGone,
    ConsoleService,
    ConsoleSession,
    ConsoleTarget,
    VMConsoleManager,
)

WEB = ConsoleTarget(vm_id=7, vm_name="web", owner="alice", domain="twarga-1-web")


class Connection:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing


class Socket:
    """The websocket side of a session: what was sent, and why it ended."""

    def __init__(self, auto_flush: bool = True) -> None:
        self.connection: Connection | None = Connection()
        self.sent: list[list[Any]] = []
        self.pending: list[asyncio.Future[None]] = []
        self.ended: list[str] = []
        self.auto_flush = auto_flush

    @property
    def ws_connection(self) -> Connection | None:
        return self.connection

    def send_json(self, message: list[Any]) -> asyncio.Future[None] | None:
        if self.connection is None:
            return None
        self.sent.append(message)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.auto_flush:
            future.set_result(None)
        else:
            self.pending.append(future)
        return future

    def end(self, reason: str) -> None:
        self.ended.append(reason)
        self.connection = None

    def text(self) -> str:
        return "".join(m[1] for m in self.sent if m[0] == "stdout")


class Channel:
    """An attached console: keystrokes written, reading paused or not, closed from where."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.reading: list[bool] = []
        self.closed_in: str | None = None

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def set_reading(self, reading: bool) -> None:
        self.reading.append(reading)

    def close(self) -> None:
        self.closed_in = threading.current_thread().name


class Attacher:
    """``ConsoleService.attach``'s place: one channel per call, callbacks kept."""

    def __init__(self) -> None:
        self.channels: list[Channel] = []
        self.callbacks: list[tuple[Callable[[bytes], None], Callable[[str], None]]] = []
        self.threads: list[str] = []

    def __call__(self, target: ConsoleTarget, on_output, on_closed) -> Channel:
        assert target is WEB
        self.threads.append(threading.current_thread().name)
        self.callbacks.append((on_output, on_closed))
        self.channels.append(Channel())
        return self.channels[-1]


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def test_output_waits_for_the_banner_and_utf8_survives_split_reads():
    manager, attach, socket = VMConsoleManager(idle_timeout=60), Attacher(), Socket()
    session = await manager.take_over(WEB, socket, attach)
    assert attach.threads[0] != threading.current_thread().name  # attached off the loop
    on_output, _ = attach.callbacks[0]
    snowman = "☃".encode()
    threading.Thread(target=lambda: on_output(b"login: " + snowman[:1])).start()
    await until(lambda: session._held == [b"login: " + snowman[:1]])
    assert socket.sent == []
    session.ready()
    on_output(snowman[1:] + b"\r\n")
    await until(lambda: socket.text() == "login: ☃\r\n")
    session.write("root\n")
    assert attach.channels[0].written == [b"root\n"]
    assert manager.sessions == {"vm-7": session}


async def test_a_new_session_takes_the_console_over():
    manager, attach = VMConsoleManager(idle_timeout=60), Attacher()
    first_socket, second_socket = Socket(), Socket()
    first = await manager.take_over(WEB, first_socket, attach)
    second = await manager.take_over(WEB, second_socket, attach)
    assert first.ended and first_socket.ended == ["taken over by a new session"]
    assert attach.channels[0].closed_in not in (None, threading.current_thread().name)
    assert manager.sessions == {"vm-7": second} and not second.ended
    first.write("ignored")
    assert attach.channels[0].written == []


async def test_the_guest_side_closing_ends_the_session():
    manager, attach, socket = VMConsoleManager(idle_timeout=60), Attacher(), Socket()
    session = await manager.take_over(WEB, socket, attach)
    _, on_closed = attach.callbacks[0]
    threading.Thread(target=on_closed, args=("the VM stopped",)).start()
    await until(lambda: session.ended and attach.channels[0].closed_in is not None)
    assert socket.ended == ["the VM stopped"] and manager.sessions == {}
    await manager.shutdown()
    assert manager.background == set()


async def test_a_socket_closed_during_attach_gets_no_session():
    manager, socket = VMConsoleManager(idle_timeout=60), Socket()
    channels = []

    def attach(target, on_output, on_closed):
        socket.connection.closing = True  # the browser leaves meanwhile
        channels.append(Channel())
        return channels[-1]

    with pytest.raises(ConsoleGone):
        await manager.take_over(WEB, socket, attach)
    assert manager.sessions == {} and channels[0].closed_in is not None
    assert socket.ended == ["closed by the client"]


async def test_unflushed_output_pauses_the_guest_until_the_browser_catches_up():
    socket = Socket(auto_flush=False)
    session = ConsoleSession(WEB, socket)
    channel = session.stream = Channel()
    session.high_water, session.low_water = 100, 40
    session.ready()
    for _ in range(6):
        session.deliver(b"x" * 20)
    assert session.unflushed == 120 and session.paused and channel.reading == [False]
    for future in socket.pending[:3]:
        future.set_result(None)
    await asyncio.sleep(0)
    assert session.unflushed == 60 and session.paused  # not below the low water yet
    socket.pending[3].set_result(None)
    await asyncio.sleep(0)
    assert session.unflushed == 40 and session.paused
    socket.pending[4].set_result(None)
    await asyncio.sleep(0)
    assert not session.paused and channel.reading == [False, True]


async def test_idle_sessions_are_culled_and_shutdown_ends_the_rest():
    manager, attach = VMConsoleManager(idle_timeout=30), Attacher()
    other = ConsoleTarget(8, "db", "bob", "twarga-2-db")
    idle_socket, busy_socket = Socket(), Socket()
    idle = await manager.take_over(WEB, idle_socket, attach)

    def attach_other(target, on_output, on_closed):
        return Channel()

    busy = await manager.take_over(other, busy_socket, attach_other)
    idle.last_input -= 31
    manager.touch(busy)
    assert await manager.cull_idle() == ["vm-7"]
    assert idle_socket.ended == ["idle"] and list(manager.sessions) == ["vm-8"]
    manager.start_culler()
    await manager.shutdown()
    assert busy.ended and busy_socket.ended == ["the server is shutting down"]
    assert manager._culler is None


class VMs:
    """What ``ConsoleService.authorize`` reads: the caller's view of one VM."""

    def __init__(self, status: str) -> None:
        self.status = status

    async def get(self, identity: Identity, vm_id: int) -> dict[str, Any]:
        if vm_id != 7 or not (identity.admin or identity.name == "alice"):
            raise NotFound(f"VM {vm_id} does not exist", "no_vm")
        return {
            "id": 7, "name": "web", "owner": "alice", "domain": "twarga-1-web",
            "status": self.status,
        }  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'consoles.db'}").open()
    yield database
    database.dispose()


async def test_the_console_of_a_running_vm_of_ones_own(db):
    consoles = ConsoleService(db, VMs("running"), "test:///default")  # type: ignore[arg-type]
    assert await consoles.authorize(Identity("alice"), 7) == WEB
    assert await consoles.authorize(Identity("root", admin=True), 7) == WEB
    with pytest.raises(NotFound):
        await consoles.authorize(Identity("bob"), 7)
    stopped = ConsoleService(db, VMs("stopped"), "test:///default")  # type: ignore[arg-type]
    with pytest.raises(Conflict) as refused:
        await stopped.authorize(Identity("alice"), 7)
    assert refused.value.reason == "vm_not_running"


def test_opening_and_closing_are_events_for_the_owner(db):
    with db.session() as session:
        alice = User(name="alice")
        session.add(alice)
        session.flush()
        session.add(
            VM(
                id=7, owner_id=alice.id, name="web", domain_name="twarga-1-web",
                image="twarga/tiny", os_type="linux", ram_mb=256, cpu=1, disk_gb=1,
                status=VMStatus.running,
            )
        )  # fmt: skip
    consoles = ConsoleService(db, VMs("running"), "test:///default")  # type: ignore[arg-type]
    admin = Identity("root", admin=True)
    consoles.record(admin, WEB, "console_open")
    consoles.record(admin, WEB, "console_close", reason="idle")
    with db.session() as session:
        events = session.scalars(select(Event).order_by(Event.id)).all()
        assert [e.message for e in events] == [
            "console of VM web opened by root",
            "console of VM web closed by root",
        ]
        assert {(e.user_name, e.vm_id, e.type) for e in events} == {("alice", 7, "vm")}
        assert events[1].details == {"action": "console_close", "actor": "root", "reason": "idle"}
