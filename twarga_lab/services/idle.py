"""Idle stop: a running VM nobody uses is stopped, so its credits stop running too.

A VM is in use while someone types on its console (the console socket calls
:meth:`IdleStopper.note_activity`), while an SSH session is established on its forward
(``127.0.0.1:ssh_port``: QEMU's user networking accepts there, so the connection shows in
``/proc/net/tcp`` with that local port, state ``01``), and while its latest CPU sample
(:class:`~twarga_lab.services.metrics.MetricsService`) is above ``idle_cpu_percent``.
A VM with none of these for ``idle_stop_after`` seconds is stopped through the VM
service's normal, graceful stop (which bills its last seconds), with an ``idle_stopped``
event its owner sees. ``idle_stop_at`` in the VM's JSON says when that will happen.

Last activity is kept in memory per VM id; it counts from the later of the VM's start
and this service's start, so a restart of the server gives every VM a full period.
The clock is the credit meter's (:func:`twarga_lab.services.credits.utcnow`), read at
call time, so a test that patches the meter's clock moves this one too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from traitlets import Float, Int, TraitError, default, validate
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import VM, User, VMStatus
from twarga_lab.errors import TwargaError
from twarga_lab.services import Identity, credits
from twarga_lab.services.background import cancel_and_wait
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.metrics import catalogue
from twarga_lab.services.vms import views

if TYPE_CHECKING:
    from twarga_lab.services.metrics import MetricsService
    from twarga_lab.services.vms import VMService

log = logging.getLogger(__name__)

SYSTEM = Identity(name="system", admin=True)
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
ESTABLISHED = "01"


def utcnow() -> datetime:
    """Idle stop's clock: the credit meter's (patch ``credits.utcnow`` in tests)."""
    return credits.utcnow()


def established_ports(tables: Iterable[Path] = TCP_TABLES) -> set[int]:
    """Local ports with an established TCP connection, read from the kernel's tables
    (``/proc/net/tcp`` lines: ``sl local_address rem_address st ...``, hex fields)."""
    ports: set[int] = set()
    for table in tables:
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != ESTABLISHED:
                continue
            _, _, port = fields[1].rpartition(":")
            try:
                ports.add(int(port, 16))
            except ValueError:
                continue
    return ports


def format_duration(seconds: float) -> str:
    """``45 s``, ``10 min``, ``2 h 5 min``."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


@dataclass(frozen=True)
class RunningVM:
    """What a check needs of a running VM."""

    id: int
    name: str
    owner: str
    ssh_port: int | None
    started_at: datetime | None


class IdleStopper(LoggingConfigurable):
    """Stops running VMs without console input, SSH session or CPU use for
    ``idle_stop_after`` seconds, checking every ``idle_check_interval``."""

    idle_stop_after = Int(
        help="Seconds a running VM may go without console input, an SSH session on its "
        "forward and CPU above idle_cpu_percent before it is stopped (gracefully, with an "
        "idle_stopped event; its credits stop running). 0 (the default) never stops one. "
        "Defaults to TwargaLabApp.idle_stop_after.",
    ).tag(config=True)

    @default("idle_stop_after")
    def _default_idle_stop_after(self) -> int:
        return int(getattr(self.parent, "idle_stop_after", 0) or 0)

    idle_cpu_percent = Float(
        5.0, help="A VM whose latest CPU sample is above this percentage is in use."
    ).tag(config=True)
    idle_check_interval = Float(
        30.0, help="Seconds between two looks for idle VMs (SSH sessions, CPU, deadlines)."
    ).tag(config=True)

    @validate("idle_stop_after")
    def _validate_idle_stop_after(self, proposal: Any) -> int:
        if proposal["value"] < 0:
            raise TraitError("idle_stop_after must be 0 (off) or a number of seconds")
        return int(proposal["value"])

    @validate("idle_check_interval")
    def _validate_interval(self, proposal: Any) -> float:
        if proposal["value"] <= 0:
            raise TraitError("idle_check_interval must be positive")
        return float(proposal["value"])

    def __init__(
        self,
        db: Database,
        vms: VMService,
        metrics: MetricsService | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.vms = vms
        self.metrics = metrics
        #: Where established TCP connections are read (tests may point elsewhere).
        self.tcp_tables: tuple[Path, ...] = TCP_TABLES
        self.since = utcnow()
        self._last: dict[int, datetime] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        views.register_idle_deadline(db.engine, self.deadline)

    # -- activity and deadlines (any thread) --------------------------------------------

    def note_activity(self, vm_id: int, at: datetime | None = None) -> None:
        """Someone used VM ``vm_id`` (typed on its console) at ``at`` (now)."""
        at = at or utcnow()
        with self._lock:
            last = self._last.get(vm_id)
            if last is None or at > last:
                self._last[vm_id] = at

    def last_activity(self, vm_id: int, started_at: datetime | None) -> datetime:
        """The later of the VM's last activity, its start and this service's start."""
        with self._lock:
            last = self._last.get(vm_id)
        return max(t for t in (last, started_at, self.since) if t is not None)

    def deadline(self, vm: VM) -> datetime | None:
        """When ``vm`` will be stopped if nobody uses it; None when idle stop is off or
        the VM is not running."""
        if self.idle_stop_after <= 0 or vm.status is not VMStatus.running:
            return None
        last = self.last_activity(vm.id, vm.started_at)
        return last + timedelta(seconds=self.idle_stop_after)

    # -- the check ------------------------------------------------------------------------

    def _running(self) -> list[RunningVM]:
        with self.db.session() as session:
            rows = session.execute(
                select(VM.id, VM.name, User.name, VM.ssh_port, VM.started_at)
                .join(User, VM.owner_id == User.id)
                .where(VM.status == VMStatus.running)
            ).all()
        return [RunningVM(*row) for row in rows]

    def _busy(self) -> set[int]:
        """VMs whose latest (recent) CPU sample is above ``idle_cpu_percent``."""
        if self.metrics is None:
            return set()
        _, readings = self.metrics.snapshot()
        fresh_after = catalogue.clock() - 3 * max(self.metrics.interval, 1.0)
        return {
            r.vm_id
            for r in readings
            if r.cpu_at is not None
            and r.cpu_at >= fresh_after
            and r.cpu_usage > self.idle_cpu_percent
        }

    def _record(self, vm: RunningVM, idle_seconds: float, last: datetime) -> None:
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.info,
                f"VM {vm.name} stopped after {format_duration(idle_seconds)} idle: no console "
                f"input, no SSH session and CPU under {self.idle_cpu_percent:g}%",
                user_name=vm.owner, vm_id=vm.id, action="idle_stopped", actor="system",
                idle_seconds=round(idle_seconds), idle_stop_after=self.idle_stop_after,
                last_activity=last.isoformat(),
            )  # fmt: skip

    async def tick(self) -> list[int]:
        """One look: SSH sessions and busy CPUs count as activity, then every running VM
        idle for ``idle_stop_after`` is stopped; returns the ids of the VMs stopped."""
        if self.idle_stop_after <= 0:
            return []
        now = utcnow()
        running = await asyncio.to_thread(self._running)
        connected = await asyncio.to_thread(established_ports, self.tcp_tables)
        busy = self._busy()
        due: list[tuple[RunningVM, datetime]] = []
        for vm in running:
            if vm.id in busy or (vm.ssh_port is not None and vm.ssh_port in connected):
                self.note_activity(vm.id, now)
            last = self.last_activity(vm.id, vm.started_at)
            if (now - last).total_seconds() >= self.idle_stop_after:
                due.append((vm, last))
        with self._lock:  # stopped or destroyed VMs start afresh at their next start
            ids = {vm.id for vm in running}
            self._last = {k: v for k, v in self._last.items() if k in ids}
        stopped = []
        for vm, last in due:
            try:
                if (await self.vms.get(SYSTEM, vm.id))["status"] != VMStatus.running.value:
                    continue
                log.info("stopping idle VM %s (%s) of %s", vm.id, vm.name, vm.owner)
                await self.vms.action(SYSTEM, vm.id, "stop")
            except TwargaError as e:
                log.warning("idle stop of VM %s failed: %s", vm.id, e.message)
                continue
            await asyncio.to_thread(self._record, vm, (now - last).total_seconds(), last)
            stopped.append(vm.id)
        return stopped

    # -- the periodic task ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.idle_check_interval)
            try:
                await self.tick()
            except Exception:
                log.exception("idle stop check failed")

    def start(self) -> None:
        """Check every ``idle_check_interval`` seconds (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop checking."""
        await cancel_and_wait(self._task)
        self._task = None
