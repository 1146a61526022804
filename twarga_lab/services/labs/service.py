"""Labs: a template's VMs and private networks, made, started, stopped, checked and
destroyed as one; and deployments, which hand a template to every member of a Hub group.

A lab is made all or nothing. Every quota, credit and name check of all its VMs runs in one
transaction under the owner's lock, so a lab that does not fit leaves no row; a VM that then
fails to build (a disk, a seed, libvirt) takes the whole lab down with it, in the
background, with a ``lab_create_failed`` event saying why.

Why it is long: one service owns a lab's whole life (template, rows, VMs, switches, keys,
checks, bans and deployments) because every step needs the same rows and locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from traitlets import Float, Int, Unicode
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.db.models import (
    VM,
    Ban,
    Deployment,
    Lab,
    LabNetwork,
    LabNIC,
    User,
    VMStatus,
    utcnow,
)
from twarga_lab.errors import (
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    TwargaError,
    ValidationFailed,
)
from twarga_lab.labs import SHIPPED_TEMPLATES
from twarga_lab.labs.template import LabTemplate, TemplateCatalogue, parse_template
from twarga_lab.schemas import CreateDeployment, CreateLab, CreateVM
from twarga_lab.services import Identity
from twarga_lab.services.bans import active_ban
from twarga_lab.services.events import EventType, Severity, record_event
from twarga_lab.services.labs.checks import CheckTarget, make_check_key, run_check
from twarga_lab.services.users import LIVE_STATUSES, UserService, lock_user
from twarga_lab.services.vms import VMService
from twarga_lab.services.vms import quota as vm_quota
from twarga_lab.virt.images import ImageStore

T = TypeVar("T")


def lab_status(statuses: list[VMStatus]) -> str:
    """A lab's status from its VMs': the one they share, else pending/error/partial."""
    live = [s for s in statuses if s is not VMStatus.destroyed]
    if not live:
        return "destroyed"
    if len(set(live)) == 1:
        return live[0].value
    if VMStatus.pending in live:
        return "pending"
    if VMStatus.error in live:
        return "error"
    return "partial"


def lab_to_json(lab: Lab, vm_view: Callable[[VM], dict[str, Any]]) -> dict[str, Any]:
    """The public view of a lab: its networks and its VMs (as ``GET /vms`` shows them)."""
    vms = [vm for vm in lab.vms if vm.status is not VMStatus.destroyed or lab.destroyed_at]
    return {
        "id": lab.id,
        "name": lab.name,
        "owner": lab.owner.name,
        "template": lab.template_name,
        "title": lab.template.get("title"),
        "status": "destroyed" if lab.destroyed_at else lab_status([vm.status for vm in vms]),
        "deployment_id": lab.deployment_id,
        "created_at": lab.created_at.isoformat(),
        "destroyed_at": lab.destroyed_at.isoformat() if lab.destroyed_at else None,
        "networks": [{"name": n.name, "cidr": n.cidr} for n in lab.networks],
        "vms": [vm_view(vm) for vm in vms],
        "checks": [c.get("name") for c in lab.template.get("checks", [])],
    }


class LabService(LoggingConfigurable):
    """Everything users do to labs and instructors do to deployments."""

    lab_templates_dir = Unicode(
        "",
        help="Folder of lab templates (*.yaml, *.yml). Empty: the templates shipped with "
        "Twarga Lab (attack-defend, web-db).",
    ).tag(config=True)
    max_labs_per_user = Int(5, help="Labs a user may have at once (their VMs count too).").tag(
        config=True
    )
    instructor_group = Unicode(
        "instructors",
        help="The Hub group of instructors (the Hub config gives it the 'instructor' role): "
        "its members deploy labs to, see and grade the other groups they belong to.",
    ).tag(config=True)
    ban_sweep_interval = Float(
        15.0, help="Seconds between lifting, inside lab VMs, the SSH bans that have ended."
    ).tag(config=True)
    check_timeout = Float(
        60.0, help="Most seconds one lab check may run before it counts as failed."
    ).tag(config=True)

    def __init__(
        self,
        db: Database,
        vms: VMService,
        users: UserService,
        images: ImageStore,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.db = db
        self.vms = vms
        self.users = users
        self.images = images
        folder = Path(self.lab_templates_dir).resolve() if self.lab_templates_dir else None
        self.catalogue = TemplateCatalogue(folder or SHIPPED_TEMPLATES)
        # Under a Hub: group members (``HubUserDirectory``); None in personal mode.
        self.hub: Any = None
        # Bans pushed into guests, (vm id, source): lifted by the sweep when they end.
        self._pushed: set[tuple[int, str]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # -- templates ------------------------------------------------------------------

    def list_templates(self) -> list[dict[str, Any]]:
        """The catalogue's templates as dicts, with how many VMs each makes."""
        return [
            {**t.to_dict(), "vm_count": t.vm_count, "machines_count": len(t.machines)}
            for t in self.catalogue.list()
        ]

    def resolve(self, template: str | Mapping[str, Any]) -> LabTemplate:
        """A template by catalogue name or as a whole object, with its images checked."""
        parsed = self.catalogue.get(template) if isinstance(template, str) else (
            parse_template(template)
        )  # fmt: skip
        parsed.check_images(self.images.exists)
        return parsed

    # -- reading --------------------------------------------------------------------

    def _vm_view(self, vm: VM) -> dict[str, Any]:
        from twarga_lab.services.vms.views import vm_to_json

        return vm_to_json(vm, vm.owner.name, ready=self.vms.readiness.is_ready(vm))

    def _visible_lab(self, session: Session, identity: Identity, lab_id: int) -> Lab:
        lab = session.get(Lab, lab_id)
        if lab is None or lab.destroyed_at is not None:
            raise NotFound(f"lab {lab_id} does not exist", "no_lab")
        if not identity.admin and lab.owner.name != identity.name:
            raise NotFound(f"lab {lab_id} does not exist", "no_lab")
        return lab

    def _lab_json(self, lab_id: int) -> dict[str, Any]:
        with self.db.session() as session:
            lab = session.get(Lab, lab_id)
            if lab is None:
                raise NotFound(f"lab {lab_id} does not exist", "no_lab")
            return lab_to_json(lab, self._vm_view)

    async def _can_teach(self, identity: Identity, deployment_id: int | None) -> bool:
        """Whether ``identity`` is an instructor of the group a deployment went to."""
        if deployment_id is None or self.hub is None:
            return False

        def group_of() -> str | None:
            with self.db.session() as session:
                deployment = session.get(Deployment, deployment_id)
                return deployment.group_name if deployment else None

        group = await self._run(group_of)
        return group is not None and await self.is_instructor(identity, group)

    async def is_instructor(self, identity: Identity, group: str) -> bool:
        """Admins teach every group; an instructor (a member of ``instructor_group``)
        teaches the other groups they are in."""
        if identity.admin:
            return True
        if self.hub is None:
            return False
        if identity.name not in await self.hub.group_members(self.instructor_group):
            return False
        return identity.name in await self.hub.group_members(group)

    async def get(self, identity: Identity, lab_id: int) -> dict[str, Any]:
        """One lab (owner, admin, or an instructor of its deployment's group)."""

        def owned() -> dict[str, Any]:
            with self.db.session() as session:
                return lab_to_json(self._visible_lab(session, identity, lab_id), self._vm_view)

        try:
            return await self._run(owned)
        except NotFound:
            deployment = await self._run(self._deployment_of, lab_id)
            if await self._can_teach(identity, deployment):
                return await self._run(self._lab_json, lab_id)
            raise

    def _deployment_of(self, lab_id: int) -> int | None:
        with self.db.session() as session:
            lab = session.get(Lab, lab_id)
            return lab.deployment_id if lab is not None and lab.destroyed_at is None else None

    def list(self, identity: Identity, all_users: bool = False) -> list[dict[str, Any]]:
        """Live labs: the caller's, or everyone's for an admin asking ``all``."""
        with self.db.session() as session:
            stmt = select(Lab).where(Lab.destroyed_at.is_(None)).order_by(Lab.id)
            if not (identity.admin and all_users):
                stmt = stmt.join(User, Lab.owner_id == User.id).where(User.name == identity.name)
            return [lab_to_json(lab, self._vm_view) for lab in session.scalars(stmt)]

    # -- create ---------------------------------------------------------------------

    async def create(self, identity: Identity, request: CreateLab) -> dict[str, Any]:
        """Accept a lab (its VMs pending) and build its VMs in the background."""
        template = await self._run(self.resolve, request.template)
        if request.spread and template.networks:
            raise ValidationFailed(
                f"lab template {template.name} has private networks, which live on one host: "
                "its machines cannot be spread over hosts",
                "spread",
                "lab_on_one_host",
            )
        lab_id = await self.create_for(
            identity.name, identity.name, template, request.name, spread=request.spread
        )
        return await self._run(self._lab_json, lab_id)

    async def create_for(
        self,
        owner: str,
        actor: str,
        template: LabTemplate,
        name: str,
        deployment_id: int | None = None,
        *,
        spread: bool = False,
    ) -> int:
        """Make ``owner``'s lab ``name`` from ``template``; returns its id. ``spread``:
        each machine on a host of its own (a template without networks)."""
        requests = await self._run(self._vm_requests, template, name)
        user_id = await self._run(self.users.ensure, owner)
        try:
            lab_id, vm_ids = await self._run(
                self._insert,
                owner, actor, user_id, template, name, requests, deployment_id, spread,
            )  # fmt: skip
        except TwargaError as refusal:
            await self._run(self._record_refusal, owner, actor, name, refusal)
            raise
        try:
            await self._run(make_check_key, self.vms.provisioner.lab_dir(lab_id))
        except TwargaError as e:
            await self._tear_down(lab_id, "system", f"its check key could not be made: {e}")
            raise
        self.vms.tasks.spawn(self._build(lab_id, vm_ids), f"build lab {lab_id}")
        return lab_id

    def _vm_requests(self, template: LabTemplate, name: str) -> list[vm_quota.CreateRequest]:
        """Each machine's VM request, checked against the VM bounds (422 as for a VM)."""
        requests = []
        for instance in template.instances():
            body = CreateVM(
                name=f"{name}-{instance.name}", image=instance.image,
                ram=instance.ram, cpu=instance.cpu, disk=instance.disk,
            )  # fmt: skip
            vm_quota.validate_name(body.name)
            requests.append(self.vms.validate_create(body))
        return requests

    def _insert(
        self,
        owner: str,
        actor: str,
        user_id: int,
        template: LabTemplate,
        name: str,
        requests: list[vm_quota.CreateRequest],
        deployment_id: int | None,
        spread: bool = False,
    ) -> tuple[int, list[int]]:
        # One transaction: a refusal of any VM leaves no lab, no network and no VM.
        with self.db.session() as session:
            lock_user(session, user_id)
            live = session.scalar(
                select(func.count(Lab.id)).where(
                    Lab.owner_id == user_id, Lab.destroyed_at.is_(None)
                )
            )
            if session.scalar(
                select(Lab.id).where(
                    Lab.owner_id == user_id, Lab.name == name, Lab.destroyed_at.is_(None)
                )
            ):
                raise Conflict(f"{owner} already has a lab named {name!r}", "name_taken")
            if (live or 0) >= self.max_labs_per_user:
                raise QuotaExceeded(
                    f"{owner} may have at most {self.max_labs_per_user} labs", "quota_exceeded"
                )
            lab = Lab(
                owner_id=user_id, name=name, template_name=template.name,
                template=template.to_dict(), deployment_id=deployment_id,
            )  # fmt: skip
            session.add(lab)
            session.flush()
            networks = {}
            for net in template.networks:
                row = LabNetwork(lab_id=lab.id, name=net.name, cidr=str(net.cidr))
                session.add(row)
                networks[net.name] = row
            session.flush()
            vm_ids = []
            # A lab lives on one host: its private networks are switches beside its QEMU
            # processes, so the host must have room for all its machines.
            # (Spread, a template without networks: each machine on a host of its own.)
            hosts = self.vms.provisioner.hosts
            host = None
            if hosts is not None and not spread:
                host = hosts.choose(session, sum(r.ram for r in requests))
            used: list[str] = []
            for instance, request in zip(template.instances(), requests, strict=True):
                vm_quota.check_create_quota(session, self.users, user_id, request)
                if hosts is not None and spread:
                    host = hosts.choose(session, request.ram, exclude=used)
                    used.append(host)
                vm = self.vms.provisioner.new_vm(
                    session, user_id, request, self.images.get(request.image), host
                )
                vm.lab_id = lab.id
                vm.lab_machine = instance.name
                for nic in instance.nics:
                    vm.nics.append(
                        LabNIC(
                            network_id=networks[nic.network].id,
                            address=str(nic.address),
                            prefix=nic.prefix,
                            mac=nic.mac,
                        )
                    )
                session.flush()  # the next VM's quota check and SSH port see this one
                vm_ids.append(vm.id)
            record_event(
                session, EventType.vm, Severity.info,
                f"lab {name} ({template.name}, {len(vm_ids)} VMs) created by {actor}",
                user_name=owner, action="lab_create", lab_id=lab.id, lab=name,
                template=template.name, vms=vm_ids, actor=actor,
                deployment_id=deployment_id,
            )  # fmt: skip
            return lab.id, vm_ids

    def _record_refusal(self, owner: str, actor: str, name: str, refusal: TwargaError) -> None:
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.warning,
                f"lab {name} refused for {owner}: {refusal.message}",
                user_name=owner, action="lab_create", reason=refusal.reason, actor=actor,
            )  # fmt: skip

    async def _build(self, lab_id: int, vm_ids: list[int]) -> None:
        """Provision every VM; if one fails, the whole lab goes."""
        await asyncio.gather(*(self.vms.lifecycle.provision(vm_id) for vm_id in vm_ids))

        def failures() -> list[str]:
            with self.db.session() as session:
                rows = session.scalars(select(VM).where(VM.id.in_(vm_ids))).all()
                return [
                    f"{vm.name}: {vm.status_message or 'failed'}"
                    for vm in rows
                    if vm.status is VMStatus.error
                ]

        failed = await self._run(failures)
        if failed:
            await self._tear_down(lab_id, "system", "; ".join(failed))

    async def _tear_down(self, lab_id: int, actor: str, why: str) -> None:
        """Remove a lab that could not be made entirely, and say why."""
        self.log.warning("lab %s could not be made: %s", lab_id, why)
        await self._destroy(lab_id, actor)

        def record() -> None:
            with self.db.session() as session:
                lab = session.get(Lab, lab_id)
                assert lab is not None
                record_event(
                    session, EventType.vm, Severity.warning,
                    f"lab {lab.name} could not be made and was removed: {why}",
                    user_name=lab.owner.name, action="lab_create_failed", lab_id=lab_id,
                    lab=lab.name, reason=why,
                )  # fmt: skip

        await self._run(record)

    # -- actions --------------------------------------------------------------------

    def _vm_ids(self, lab_id: int) -> list[int]:
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(VM.id).where(VM.lab_id == lab_id, VM.status.in_(LIVE_STATUSES))
                )
            )

    async def action(self, identity: Identity, lab_id: int, action: str) -> dict[str, Any]:
        """start, stop or destroy every VM of the lab; returns the lab as it is now."""
        lab = await self.get(identity, lab_id)
        if action == "destroy":
            await self.destroy(identity, lab_id)
            return await self._run(self._lab_json, lab_id)
        vm_ids = await self._run(self._vm_ids, lab_id)
        results = await asyncio.gather(
            *(self.vms.action(identity, vm_id, action) for vm_id in vm_ids),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        await self._run(self._record_action, lab, identity.name, action, errors)
        if errors:
            raise errors[0]  # the first refusal, as one VM's action would give it
        return await self._run(self._lab_json, lab_id)

    def _record_action(
        self, lab: dict[str, Any], actor: str, action: str, errors: list[BaseException]
    ) -> None:
        with self.db.session() as session:
            record_event(
                session, EventType.vm, Severity.warning if errors else Severity.info,
                f"lab {lab['name']}: {action} requested by {actor}"
                + (f" ({len(errors)} VMs refused: {errors[0]})" if errors else ""),
                user_name=lab["owner"], action=f"lab_{action}", lab_id=lab["id"],
                lab=lab["name"], actor=actor,
            )  # fmt: skip

    async def destroy(self, identity: Identity, lab_id: int) -> None:
        """Destroy every VM and network of the lab; the rows stay as history."""
        await self.get(identity, lab_id)
        await self._destroy(lab_id, identity.name)

    async def _destroy(self, lab_id: int, actor: str) -> None:
        system = Identity(name=actor, admin=True)
        vm_ids = await self._run(self._vm_ids, lab_id)
        await asyncio.gather(*(self.vms.destroy(system, vm_id) for vm_id in vm_ids))

        def finish() -> list[int]:
            with self.db.session() as session:
                lab = session.get(Lab, lab_id)
                assert lab is not None
                if lab.destroyed_at is None:
                    lab.destroyed_at = utcnow()
                    record_event(
                        session, EventType.vm, Severity.info,
                        f"lab {lab.name} destroyed by {actor}",
                        user_name=lab.owner.name, action="lab_destroy", lab_id=lab_id,
                        lab=lab.name, actor=actor,
                    )  # fmt: skip
                return [n.id for n in lab.networks]

        network_ids = await self._run(finish)
        provisioner = self.vms.provisioner

        def remove_files() -> None:
            from twarga_lab.virt.switch import stop_switch

            for network_id in network_ids:
                stop_switch(provisioner.switch_dir(network_id))
            shutil.rmtree(provisioner.lab_dir(lab_id), True)

        await self._run(remove_files)

    # -- checks ---------------------------------------------------------------------

    def _check_targets(self, lab_id: int) -> tuple[LabTemplate, dict[str, CheckTarget]]:
        with self.db.session() as session:
            lab = session.get(Lab, lab_id)
            assert lab is not None
            template = parse_template(lab.template)
            targets = {}
            for vm in lab.vms:
                if vm.status is VMStatus.destroyed or vm.lab_machine is None:
                    continue
                image = self.images.get(vm.image)
                assert vm.domain_name is not None
                targets[vm.lab_machine] = CheckTarget(
                    machine=vm.lab_machine, vm_id=vm.id, port=vm.ssh_port,
                    user="root" if image.kind == "kernel" else image.default_user or "root",
                    host_key=self.vms.host_key(vm.domain_name),
                    running=vm.status is VMStatus.running,
                )  # fmt: skip
            return template, targets

    async def check(self, identity: Identity, lab_id: int) -> dict[str, Any]:
        """Run the lab's checks (owner, admin or instructor) and grade them."""
        lab = await self.get(identity, lab_id)
        return await self._check(lab, identity.name)

    async def _check(self, lab: dict[str, Any], actor: str) -> dict[str, Any]:
        template, targets = await self._run(self._check_targets, lab["id"])
        key = self.vms.provisioner.lab_dir(lab["id"]) / "check_key"
        missing = CheckTarget("?", None, None, "root", None, False)
        outcomes = await asyncio.gather(
            *(
                run_check(
                    check,
                    targets.get(check.machine, missing),
                    key,
                    min(float(check.timeout), self.check_timeout),
                )
                for check in template.checks
            )
        )
        results = [o.to_json() for o in outcomes]
        score = sum(o.score for o in outcomes)
        max_score = sum(o.points for o in outcomes)

        def record() -> None:
            with self.db.session() as session:
                record_event(
                    session, EventType.vm, Severity.info,
                    f"lab {lab['name']} checked by {actor}: {score:g}/{max_score:g}",
                    user_name=lab["owner"], action="lab_check", lab_id=lab["id"],
                    lab=lab["name"], actor=actor, score=score, max_score=max_score,
                    passed=[o.check for o in outcomes if o.passed],
                )  # fmt: skip

        await self._run(record)
        return {
            "lab_id": lab["id"],
            "lab": lab["name"],
            "owner": lab["owner"],
            "results": results,
            "score": score,
            "max_score": max_score,
        }

    # -- deployments ----------------------------------------------------------------

    def _deployment_to_json(self, deployment: Deployment) -> dict[str, Any]:
        labs = [lab for lab in deployment.labs if lab.destroyed_at is None]
        return {
            "id": deployment.id,
            "name": deployment.name,
            "group": deployment.group_name,
            "template": deployment.template_name,
            "created_by": deployment.created_by,
            "created_at": deployment.created_at.isoformat(),
            "students": sorted(lab.owner.name for lab in labs),
            "labs": [lab_to_json(lab, self._vm_view) for lab in labs],
        }

    def _deployment_json(self, deployment_id: int) -> dict[str, Any]:
        with self.db.session() as session:
            deployment = session.get(Deployment, deployment_id)
            if deployment is None:
                raise NotFound(f"deployment {deployment_id} does not exist", "no_deployment")
            return self._deployment_to_json(deployment)

    async def deploy(self, identity: Identity, request: CreateDeployment) -> dict[str, Any]:
        """A lab from the template for every member of the group (not its instructors)."""
        if self.hub is None and not identity.admin:
            raise Forbidden("deployments need JupyterHub groups", "no_hub")
        if not await self.is_instructor(identity, request.group):
            raise Forbidden(
                f"only admins and instructors of group {request.group!r} may deploy to it",
                "not_instructor",
            )
        template = await self._run(self.resolve, request.template)
        members = await self.hub.group_members(request.group) if self.hub else []
        teachers = await self.hub.group_members(self.instructor_group) if self.hub else []
        students = [m for m in members if m not in teachers and m != identity.name]

        def insert() -> int:
            with self.db.session() as session:
                deployment = Deployment(
                    name=request.name, group_name=request.group, template_name=template.name,
                    template=template.to_dict(), created_by=identity.name,
                )  # fmt: skip
                session.add(deployment)
                session.flush()
                record_event(
                    session, EventType.vm, Severity.info,
                    f"lab {template.name} deployed to group {request.group} by {identity.name}"
                    f" ({len(students)} students)",
                    user_name=identity.name, action="lab_deploy", deployment_id=deployment.id,
                    group=request.group, students=students, template=template.name,
                )  # fmt: skip
                return deployment.id

        deployment_id = await self._run(insert)
        refused = {}
        for student in students:
            try:
                await self.create_for(student, identity.name, template, request.name, deployment_id)
            except TwargaError as e:
                refused[student] = {"message": e.message, "reason": e.reason}
        view = await self._run(self._deployment_json, deployment_id)
        return {**view, "refused": refused}

    def list_deployments(self, identity: Identity) -> list[dict[str, Any]]:
        """Deployments the caller made (admins: all)."""
        with self.db.session() as session:  # one session for the whole listing
            stmt = select(Deployment).order_by(Deployment.id)
            if not identity.admin:
                stmt = stmt.where(Deployment.created_by == identity.name)
            return [self._deployment_to_json(d) for d in session.scalars(stmt)]

    async def get_deployment(self, identity: Identity, deployment_id: int) -> dict[str, Any]:
        """One deployment with every student's lab (admins and the group's instructors)."""
        view = await self._run(self._deployment_json, deployment_id)
        if not (view["created_by"] == identity.name or await self._can_teach(
            identity, deployment_id
        )):  # fmt: skip
            raise NotFound(f"deployment {deployment_id} does not exist", "no_deployment")
        return view

    async def check_deployment(self, identity: Identity, deployment_id: int) -> dict[str, Any]:
        """Run the checks of every student's lab; one grade per student."""
        view = await self.get_deployment(identity, deployment_id)
        graded = await asyncio.gather(*(self._check(lab, identity.name) for lab in view["labs"]))
        return {
            "deployment_id": deployment_id,
            "name": view["name"],
            "group": view["group"],
            "template": view["template"],
            "labs": list(graded),
        }

    # -- bans inside labs -------------------------------------------------------------

    def enforce_ban(self, vm_id: int, source: str) -> bool:
        """Push a ban of ``source`` into lab VM ``vm_id`` (blocking; from the SOC's worker
        thread): only for an address of the VM's own lab segments, and only where the guest
        has a control port. True once the guest acknowledged it."""
        pushed = self._push(vm_id, source, ban=True)
        if pushed:
            self._pushed.add((vm_id, source))
        return pushed

    def _push(self, vm_id: int, source: str, *, ban: bool) -> bool:
        from twarga_lab.virt.domain import CONTROL_CHANNEL, channel_socket_path
        from twarga_lab.virt.guest_control import send_control_line

        try:
            address = ipaddress.IPv4Address(source)
        except ValueError:
            return False
        with self.db.session() as session:
            vm = session.get(VM, vm_id)
            if vm is None or vm.lab_id is None or vm.status is not VMStatus.running:
                return False
            cidrs = [ipaddress.IPv4Network(nic.network.cidr) for nic in vm.nics]
            domain = vm.domain_name
        if domain is None or not any(address in cidr for cidr in cidrs):
            return False  # an address from outside the lab is not the guest's to refuse
        verb = "ban" if ban else "unban"
        try:
            path = channel_socket_path(self.vms.backend.domain_xml(domain), CONTROL_CHANNEL)
            if path is None:
                return False
            send_control_line(path, f"{verb} {address}")
        except (OSError, ValueError, TwargaError) as e:
            self.log.warning("could not %s %s in VM %s: %s", verb, source, vm_id, e)
            return False
        return True

    def track_bans(self) -> int:
        """After a restart: the bans in force on running lab VMs are the guests' still, so
        the sweep must lift them when they end. Returns how many are tracked."""
        with self.db.session() as session:
            running = session.scalars(
                select(VM.id).where(VM.lab_id.is_not(None), VM.status == VMStatus.running)
            ).all()
            scopes = {f"vm:{vm_id}": vm_id for vm_id in running}
            bans = session.execute(select(Ban.scope, Ban.source).where(Ban.scope.in_(scopes))).all()
        rows = [(scopes[scope], source) for scope, source in bans]
        self._pushed.update((vm_id, source) for vm_id, source in rows)
        return len(rows)

    def sweep_bans(self, now: datetime | None = None) -> list[tuple[int, str]]:
        """Lift, inside the guests, the lab bans that have ended; returns those lifted."""
        lifted = []
        for vm_id, source in sorted(self._pushed):
            with self.db.session() as session:
                if active_ban(session, f"vm:{vm_id}", source, now) is not None:
                    continue
                vm = session.get(VM, vm_id)
                running = vm is not None and vm.status is VMStatus.running
            if running and not self._push(vm_id, source, ban=False):
                continue  # the guest did not answer: try again at the next sweep
            self._pushed.discard((vm_id, source))
            if running:
                lifted.append((vm_id, source))
                with self.db.session() as session:
                    vm = session.get(VM, vm_id)
                    assert vm is not None
                    record_event(
                        session, EventType.security, Severity.info,
                        f"ban of {source} on {vm.name} ended: the VM accepts it again",
                        user_name=vm.owner.name, vm_id=vm_id, source=source,
                        action="ban_lifted", enforced=True,
                    )  # fmt: skip
        return lifted

    async def start(self) -> None:
        """Track the bans guests hold and lift them as they end, every ``ban_sweep_interval``."""
        await self._run(self.track_bans)

        async def loop() -> None:
            while True:
                await asyncio.sleep(self.ban_sweep_interval)
                try:
                    await self._run(self.sweep_bans)
                except Exception:  # a failed sweep must not end the loop
                    self.log.exception("lifting ended lab bans failed")

        self._sweeper = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
