"""The Twarga Lab server extension: app-wide settings are its traits, each service is a
``LoggingConfigurable`` with its own (``c.MetricsService.interval``), built with
``parent=self`` in :meth:`TwargaLabApp.make_services`; the old ``c.TwargaLabApp.*`` names
of the services' settings are deprecated aliases (``ALIASES``). Routes are registered in
``initialize_handlers`` and everything is torn down in ``stop_extension``.

Why it is long: every app-wide setting is a trait with its help text (the reference
``--help-all`` prints), and ``Services``, the object every handler reaches, lives here.
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jupyter_server.extension.application import ExtensionApp
from sqlalchemy.engine import make_url
from traitlets import Dict, Enum, Int, List, TraitType, Type, Unicode, default, observe, validate
from traitlets.config import LoggingConfigurable

from twarga_lab.db import Database
from twarga_lab.handlers import ROUTES
from twarga_lab.handlers.proxy import PROXY_ROUTES, ProxyTarget
from twarga_lab.services import Identity
from twarga_lab.services.consoles import ConsoleService, VMConsoleManager
from twarga_lab.services.credits import CreditMeter, CreditService
from twarga_lab.services.hosts import HostService
from twarga_lab.services.hubusers import HubUserDirectory
from twarga_lab.services.idle import IdleStopper
from twarga_lab.services.labs import LabService
from twarga_lab.services.metrics import MetricsService
from twarga_lab.services.metrics.prometheus import HypervisorCollector
from twarga_lab.services.metrics.service import default_scrape_token
from twarga_lab.services.snapshots import SnapshotService
from twarga_lab.services.soc import SocService
from twarga_lab.services.syslog import SyslogCollector, SyslogService
from twarga_lab.services.users import UserService
from twarga_lab.services.vms import VMService
from twarga_lab.virt.backend import HypervisorBackend
from twarga_lab.virt.host_images import HostImageCache
from twarga_lab.virt.hosts import Host, HostPool, parse_host_entries
from twarga_lab.virt.images import TINY_IMAGE, ImageStore
from twarga_lab.virt.libvirt_backend import LibvirtBackend
from twarga_lab.virt.probe import resolve_domain_type

T = TypeVar("T")


def absolute_path(value: str) -> str:
    """``value`` with ``~`` expanded, made absolute against the working directory."""
    return str(Path(value).expanduser().absolute())


def absolute_sqlite_url(url: str) -> str:
    """A SQLite URL with a relative file made absolute (other URLs unchanged), so the
    database stays the same file whatever the process's working directory is later."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return url
    path, _, query = url[len(prefix) :].partition("?")
    if not path or path == ":memory:" or path.startswith("/"):
        return url
    return prefix + absolute_path(path) + (f"?{query}" if query else "")


# Settings that moved from TwargaLabApp to the service that uses them: the old name is a
# deprecated alias of ``c.<Service>.<trait>``, with the same default, type and checks.
ALIASES: dict[str, tuple[type[LoggingConfigurable], str]] = {
    "default_image": (VMService, "default_image"),
    "stop_timeout": (VMService, "stop_timeout"),
    "min_ram_mb": (VMService, "min_ram_mb"),
    "max_ram_mb": (VMService, "max_ram_mb"),
    "min_cpu": (VMService, "min_cpu"),
    "max_cpu": (VMService, "max_cpu"),
    "min_disk_gb": (VMService, "min_disk_gb"),
    "max_disk_gb": (VMService, "max_disk_gb"),
    "ssh_port_min": (VMService, "ssh_port_min"),
    "ssh_port_max": (VMService, "ssh_port_max"),
    "starting_credits": (UserService, "starting_credits"),
    "max_vms_per_user": (UserService, "max_vms"),
    "max_ram_per_user_mb": (UserService, "max_ram_mb"),
    "credits_per_vcpu_hour": (CreditService, "per_vcpu_hour"),
    "credits_per_gb_ram_hour": (CreditService, "per_gb_ram_hour"),
    "metering_interval": (CreditService, "interval"),
    "metrics_interval": (MetricsService, "interval"),
    "metrics_slow_interval": (MetricsService, "slow_interval"),
    "metrics_raw_retention_hours": (MetricsService, "raw_retention_hours"),
    "metrics_minute_retention_days": (MetricsService, "minute_retention_days"),
    "metrics_hour_retention_days": (MetricsService, "hour_retention_days"),
    "metrics_prune_interval": (MetricsService, "prune_interval"),
    "metrics_cpu_threshold": (MetricsService, "cpu_threshold"),
    "metrics_memory_threshold": (MetricsService, "memory_threshold"),
    "metrics_disk_threshold": (MetricsService, "disk_threshold"),
    "metrics_threshold_seconds": (MetricsService, "threshold_seconds"),
    "metrics_scrape_token": (MetricsService, "scrape_token"),
    "syslog_address": (SyslogService, "address"),
    "syslog_trusted_sources": (SyslogService, "trusted_sources"),
    "syslog_source_queue_size": (SyslogService, "source_queue_size"),
    "syslog_source_rate": (SyslogService, "source_rate"),
    "syslog_tcp_timeout": (SyslogService, "tcp_timeout"),
    "soc_event_retention_days": (SocService, "event_retention_days"),
    "soc_prune_interval": (SocService, "prune_interval"),
    "bruteforce_maxretry": (SocService, "maxretry"),
    "bruteforce_findtime": (SocService, "findtime"),
    "bruteforce_bantime": (SocService, "bantime"),
    "console_idle_timeout": (VMConsoleManager, "idle_timeout"),
    "max_snapshots_per_vm": (SnapshotService, "max_per_vm"),
}


def alias(old: str) -> TraitType[Any, Any]:
    """The TwargaLabApp trait ``old``: a copy of the trait it is an alias of (type, default,
    validation), its help saying where the setting lives now."""
    cls, new = ALIASES[old]
    trait = copy.deepcopy(cls.class_traits()[new])
    trait.help = f"Deprecated: use {cls.__name__}.{new}. {trait.help}"
    trait.metadata = {**trait.metadata, "help": trait.help}
    return trait


@dataclass
class Services:
    """What the handlers reach through ``self.services``."""

    db: Database
    backend: HypervisorBackend
    images: ImageStore
    users: UserService
    vms: VMService
    credits: CreditService
    meter: CreditMeter
    personal_user: str
    metrics: MetricsService
    soc: SocService
    syslog: SyslogService
    consoles: ConsoleService
    snapshots: SnapshotService
    labs: LabService

    hosts: HostService | None = None  # the hypervisor hosts and placement
    hub_users: HubUserDirectory | None = None  # service mode under a Hub only
    idle: IdleStopper | None = None  # stops VMs nobody uses (idle_stop_after)

    async def identify(self, user: Any) -> Identity:
        """The Twarga identity of a Jupyter ``current_user``.

        Under JupyterHub the user carries the Hub's model; the admin flag comes from it or,
        when the token's scopes hide it, from the Hub's API. Otherwise this is personal
        mode, where the one person is the server's owner and an admin.
        """
        hub_user = getattr(user, "hub_user", None)
        if isinstance(hub_user, dict) and hub_user.get("name"):
            name = str(hub_user["name"])
            # A disabled account is refused on every request, whatever token or cookie the
            # Hub (or its cache here) still honours: its state is read from Twarga's DB.
            from twarga_lab.errors import Forbidden
            from twarga_lab.services.accounts import account_refusal

            refusal = await self.run(account_refusal, self.db, name)
            if refusal:
                raise Forbidden(refusal, "account_disabled")
            if "admin" in hub_user:
                return Identity(name=name, admin=bool(hub_user["admin"]))
            if self.hub_users is not None:
                return Identity(name=name, admin=await self.hub_users.is_admin(name))
            return Identity(name=name, admin=False)
        return Identity(name=self.personal_user, admin=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking service call in a worker thread."""
        return await asyncio.to_thread(fn, *args)


class TwargaLabApp(ExtensionApp):
    """Twarga Lab: real VMs over libvirt, credits, metrics and a SOC inside Jupyter."""

    name = "twarga_lab"
    load_other_extensions = True

    libvirt_uri = Unicode(
        help="""libvirt connection URI. ``qemu:///system`` runs real guests;
        ``test:///default`` is libvirt's in-memory driver for fast tests.""",
    ).tag(config=True)

    @default("libvirt_uri")
    def _default_libvirt_uri(self) -> str:
        return os.environ.get("TWARGA_LIBVIRT_URI", "qemu:///system")

    hosts = List(
        Unicode(),
        help="""The hypervisor hosts, each ``name=uri`` (a libvirt URI: ``qemu:///system``,
        ``qemu+ssh://root@h2/system``, ``qemu+tls://h3/system``); a bare URI is named after
        its host part. Empty (the default): one host, ``local``, at ``libvirt_uri``. New VMs
        go on the host with the most free RAM (``HostService.ram_overcommit``); a lab stays
        on one host. Hosts share the VM folder (``vms_dir``) and the images, as
        hosts of one machine or of one shared filesystem do. ``$TWARGA_HOSTS`` (entries
        separated by spaces) is the default.""",
    ).tag(config=True)

    @default("hosts")
    def _default_hosts(self) -> list[str]:
        return os.environ.get("TWARGA_HOSTS", "").split()

    host_image_dirs = Dict(
        value_trait=Unicode(),
        help="""Hosts with storage of their own: host name -> a folder on that host where
        it keeps copies of the images, uploaded through libvirt (a ``twarga-images`` storage
        pool) the first time a VM of the image goes there, progress in ``GET
        /twarga/api/hosts``. Hosts not named here use ``images_dir`` as it is.""",
    ).tag(config=True)

    host_domain_types = Dict(
        value_trait=Enum(["kvm", "qemu"]),
        help="""The libvirt domain type of each host's guests where it differs from this
        machine's: host name -> ``kvm`` or ``qemu`` (TCG). Hosts not named here use
        ``domain_type``, resolved on this machine (the ``auto`` probe boots a guest here and
        cannot judge another host's KVM). Shown as ``domain_type`` in ``GET
        /twarga/api/hosts``.""",
    ).tag(config=True)

    vms_dir = Unicode(
        help="""Where VM disks, seeds, console logs (``instances/``) and, by default, images
        and the SQLite database live. Relative paths are taken from the working directory.""",
    ).tag(config=True)

    # Paths are made absolute once, here: qemu-img resolves a relative backing file against
    # the overlay's folder, and libvirt's QEMU does not share our working directory.
    # (traitlets validates assigned values only, so each default is made absolute too.)
    @default("vms_dir")
    def _default_vms_dir(self) -> str:
        return absolute_path(os.environ.get("TWARGA_VMS_DIR", "./vms"))

    @validate("vms_dir")
    def _validate_vms_dir(self, proposal: Any) -> str:
        return absolute_path(proposal["value"])

    images_dir = Unicode(
        help="Where bootable images live (``twarga-lab image build`` writes here). "
        "Defaults to ``<vms_dir>/images``.",
    ).tag(config=True)

    @default("images_dir")
    def _default_images_dir(self) -> str:
        return absolute_path(
            os.environ.get("TWARGA_IMAGES_DIR") or str(Path(self.vms_dir) / "images")
        )

    @validate("images_dir")
    def _validate_images_dir(self, proposal: Any) -> str:
        return absolute_path(proposal["value"])

    db_url = Unicode(
        help="SQLAlchemy URL of Twarga's database: SQLite (default, ``<vms_dir>/twarga.db``) "
        "or PostgreSQL (``postgresql+psycopg://user:pw@host/db``).",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        return absolute_sqlite_url(
            os.environ.get("TWARGA_DB_URL") or f"sqlite:///{Path(self.vms_dir) / 'twarga.db'}"
        )

    @validate("db_url")
    def _validate_db_url(self, proposal: Any) -> str:
        return absolute_sqlite_url(proposal["value"])

    domain_type = Enum(
        ["auto", "kvm", "qemu"],
        default_value="auto",
        help="""libvirt domain type. ``auto`` uses KVM only if a KVM guest really boots on
        this host (probed once and cached next to the images), else ``qemu`` (TCG).""",
    ).tag(config=True)

    domain_prefix = Unicode(
        "twarga-",
        help="Prefix of the libvirt domain names Twarga owns; other domains are left alone.",
    ).tag(config=True)

    # Deprecated aliases (see ALIASES): each setting's home is now its service's class.
    default_image = alias("default_image")
    stop_timeout = alias("stop_timeout")
    min_ram_mb = alias("min_ram_mb")
    max_ram_mb = alias("max_ram_mb")
    min_cpu = alias("min_cpu")
    max_cpu = alias("max_cpu")
    min_disk_gb = alias("min_disk_gb")
    max_disk_gb = alias("max_disk_gb")
    ssh_port_min = alias("ssh_port_min")
    ssh_port_max = alias("ssh_port_max")
    starting_credits = alias("starting_credits")
    max_vms_per_user = alias("max_vms_per_user")
    max_ram_per_user_mb = alias("max_ram_per_user_mb")
    credits_per_vcpu_hour = alias("credits_per_vcpu_hour")
    credits_per_gb_ram_hour = alias("credits_per_gb_ram_hour")
    metering_interval = alias("metering_interval")
    metrics_interval = alias("metrics_interval")
    metrics_slow_interval = alias("metrics_slow_interval")
    metrics_raw_retention_hours = alias("metrics_raw_retention_hours")
    metrics_minute_retention_days = alias("metrics_minute_retention_days")
    metrics_hour_retention_days = alias("metrics_hour_retention_days")
    metrics_prune_interval = alias("metrics_prune_interval")
    metrics_cpu_threshold = alias("metrics_cpu_threshold")
    metrics_memory_threshold = alias("metrics_memory_threshold")
    metrics_disk_threshold = alias("metrics_disk_threshold")
    metrics_threshold_seconds = alias("metrics_threshold_seconds")
    metrics_scrape_token = alias("metrics_scrape_token")

    @default("metrics_scrape_token")
    def _default_metrics_scrape_token(self) -> str:
        return default_scrape_token()

    syslog_address = alias("syslog_address")
    syslog_trusted_sources = alias("syslog_trusted_sources")
    syslog_source_queue_size = alias("syslog_source_queue_size")
    syslog_source_rate = alias("syslog_source_rate")
    syslog_tcp_timeout = alias("syslog_tcp_timeout")
    soc_event_retention_days = alias("soc_event_retention_days")
    soc_prune_interval = alias("soc_prune_interval")
    bruteforce_maxretry = alias("bruteforce_maxretry")
    bruteforce_findtime = alias("bruteforce_findtime")
    bruteforce_bantime = alias("bruteforce_bantime")
    console_idle_timeout = alias("console_idle_timeout")
    max_snapshots_per_vm = alias("max_snapshots_per_vm")

    idle_stop_after = Int(
        0,
        help="""Seconds a running VM may go without console input, an SSH session and CPU
        above ``IdleStopper.idle_cpu_percent`` before it is stopped, with an
        ``idle_stopped`` event (its credits stop running). 0: never.""",
    ).tag(config=True)

    max_body_bytes = Int(
        64 * 1024,
        help="""Largest request body (bytes) the Twarga API decodes; larger ones answer 413
        before any JSON is parsed. API bodies are a few hundred bytes.""",
    ).tag(config=True)
    max_http_body_bytes = Int(
        1024 * 1024,
        help="""In service mode (the Hub's ``twarga`` service, reachable by every tenant), the
        HTTP server's own limit (``ServerApp.max_body_size``, 512 MiB by default): bodies over
        it are refused before they are read into memory. Personal mode keeps JupyterLab's
        limit for file uploads.""",
    ).tag(config=True)

    personal_user = Unicode(
        help="In personal mode (no JupyterHub), the one user's name; they are an admin.",
    ).tag(config=True)

    @default("personal_user")
    def _default_personal_user(self) -> str:
        return os.environ.get("TWARGA_USER") or getpass.getuser()

    mode = Enum(
        ["auto", "personal", "service", "proxy"],
        default_value="auto",
        help="""``personal``: one person, local libvirt and database (``jupyter lab``).
        ``service``: the Hub's ``twarga`` service; users are Hub users, admins by the Hub's
        flag. ``proxy``: a Hub user's own server; ``/twarga/api`` is forwarded to the
        service with the server's token, and nothing here touches libvirt or the database.
        ``auto`` reads ``$TWARGA_MODE`` and falls back to ``personal``.""",
    ).tag(config=True)

    service_url = Unicode(
        help="In proxy mode, the twarga service's URL (``$TWARGA_SERVICE_URL``).",
    ).tag(config=True)

    @default("service_url")
    def _default_service_url(self) -> str:
        return os.environ.get("TWARGA_SERVICE_URL") or os.environ.get("TWARGA_URL", "")

    backend_class = Type(
        default_value=LibvirtBackend,
        klass=HypervisorBackend,
        help="""The hypervisor backend: a ``HypervisorBackend`` subclass, made as
        ``backend_class(libvirt_uri)``. The default drives libvirt.""",
    ).tag(config=True)

    # ``jupyter ... --help-all`` documents the services' settings too.
    classes = [
        *ExtensionApp.classes,
        UserService,
        VMService,
        CreditService,
        MetricsService,
        SocService,
        SyslogService,
        ConsoleService,
        VMConsoleManager,
        SnapshotService,
        IdleStopper,
        LabService,
        HostService,
    ]

    services: Services | None = None

    @property
    def resolved_mode(self) -> str:
        """The mode in force: the setting, or ``$TWARGA_MODE`` for ``auto``."""
        if self.mode != "auto":
            return self.mode
        env = os.environ.get("TWARGA_MODE", "personal")
        return env if env in ("personal", "service", "proxy") else "personal"

    def resolved_domain_type(self) -> str:
        """``qemu`` or ``kvm``: the setting, or the probe's answer for ``auto``."""
        if self.libvirt_uri.startswith("test:"):
            return "qemu"  # the test driver runs nothing
        images = ImageStore(Path(self.images_dir))
        tiny = images.get(TINY_IMAGE) if images.exists(TINY_IMAGE) else None
        return resolve_domain_type(
            self.domain_type,
            tiny.kernel if tiny else None,
            tiny.initrd if tiny else None,
            Path(self.images_dir) / "kvm-probe.json",
        )

    def warn_if_unreachable(self, folder: Path) -> None:
        """libvirt runs QEMU as its own user: every folder above the disks must be
        searchable by others, or guests fail to start with "Permission denied"."""
        for parent in [folder, *folder.parents]:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                self.log.warning(
                    "Twarga Lab: %s is not searchable by other users, so libvirt's QEMU "
                    "cannot open VM disks below it; use a vms_dir outside it or chmod o+x it",
                    parent,
                )
                return

    def apply_aliases(self) -> None:
        """Copy each deprecated ``TwargaLabApp.*`` setting that is set (in a config file,
        on the command line or on this object) to its new home, ``c.<Service>.<trait>``,
        unless that is set itself; one deprecation warning per alias."""
        for old, (cls, new) in ALIASES.items():
            if old not in self.config.TwargaLabApp and old not in self._aliases_set:
                continue
            section = self.config[cls.__name__]
            if new in section and (old, new) not in self._aliases_copied:
                continue  # the new name wins
            section[new] = getattr(self, old)
            if (old, new) not in self._aliases_copied:
                self._aliases_copied.add((old, new))
                self.log.warning("TwargaLabApp.%s is deprecated, use %s.%s", old, cls.__name__, new)

    @property
    def _aliases_set(self) -> set[str]:
        return self.__dict__.setdefault("_twarga_aliases_set", set())

    @property
    def _aliases_copied(self) -> set[tuple[str, str]]:
        return self.__dict__.setdefault("_twarga_aliases_copied", set())

    @observe(*ALIASES)
    def _alias_changed(self, change: Any) -> None:
        """A deprecated setting assigned on this object: remembered for
        :meth:`apply_aliases`, and passed on at once to a running service (so a changed
        ``syslog_trusted_sources`` applies at once, as it always did)."""
        self._aliases_set.add(change["name"])
        if self.services is None:
            return
        cls, new = ALIASES[change["name"]]
        for service in self.live_services():
            if isinstance(service, cls):
                setattr(service, new, change["new"])
                if (change["name"], new) in self._aliases_copied:
                    self.config[cls.__name__][new] = change["new"]

    def live_services(self) -> list[LoggingConfigurable]:
        """The configurable services of the running extension."""
        s = self.services
        if s is None:
            return []
        found = [s.users, s.vms, s.credits, s.metrics, s.soc, s.syslog, s.consoles, s.snapshots]
        manager = self.settings.get("twarga_lab_consoles")
        return [x for x in [*found, manager] if isinstance(x, LoggingConfigurable)]

    def make_services(self) -> Services:
        """Open the database (refusing an outdated one), make the backend
        (``backend_class``) and every service, each configured from its own config
        section. Also how a restart on the same database is simulated in tests."""
        self.apply_aliases()
        vms_dir = Path(self.vms_dir)
        vms_dir.mkdir(parents=True, exist_ok=True)
        specs = parse_host_entries(list(self.hosts), self.libvirt_uri)
        if any(spec.uri.startswith("qemu:///system") for spec in specs):
            self.warn_if_unreachable(vms_dir)
        db = Database(self.db_url).open()
        backend = HostPool([Host(spec, self.backend_class(spec.uri)) for spec in specs])
        for name, folder in self.host_image_dirs.items():
            host = backend.host(name)
            host.images = HostImageCache(name, host.backend.call, absolute_path(folder))
        for name in self.host_domain_types:
            backend.host(name)  # a name that is not a host is a typo, refused here
        domain_type = self.resolved_domain_type()
        for host in backend.hosts.values():
            host.domain_type = self.host_domain_types.get(host.name, domain_type)
        hosts = HostService(db, backend, vms_dir, parent=self)
        images = ImageStore(Path(self.images_dir))
        users = UserService(db, backend=backend, parent=self)  # snapshots count as disk
        vms = VMService(
            db,
            backend,
            images,
            users,
            vms_dir=vms_dir,
            domain_type=domain_type,
            domain_prefix=self.domain_prefix,
            # Only the test driver runs nothing (switches and seeds are skipped for it).
            runs_guests=not all(spec.uri.startswith("test:") for spec in specs),
            parent=self,
        )
        vms.provisioner.hosts = hosts  # placement of new VMs and labs
        credits = CreditService(db, users, parent=self)
        vms.billing = credits  # a VM that stops pays for its seconds since the last tick
        metrics = MetricsService(
            db, backend, domain_prefix=self.domain_prefix, disk_path=vms_dir, parent=self
        )
        soc = SocService(db, parent=self)
        syslog = SyslogService(soc, db, backend, domain_prefix=self.domain_prefix, parent=self)
        metrics.registry.register(SyslogCollector(syslog))
        metrics.registry.register(HypervisorCollector(backend))
        labs = LabService(db, vms, users, images, parent=self)
        soc.enforcer = labs.enforce_ban  # brute force inside a lab is refused by the target
        return Services(
            db,
            backend,
            images,
            users,
            vms,
            credits,
            CreditMeter(credits, vms),
            self.personal_user,
            metrics=metrics,
            soc=soc,
            syslog=syslog,
            consoles=ConsoleService(db, vms, self.libvirt_uri, parent=self),
            snapshots=SnapshotService(db, backend, vms, parent=self),
            idle=IdleStopper(db, vms, metrics, parent=self),
            labs=labs,
            hosts=hosts,
        )

    def initialize_settings(self) -> None:
        if self.resolved_mode == "proxy":
            token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
            if not self.service_url or not token:
                self.log.error("Twarga Lab proxy mode needs $TWARGA_SERVICE_URL and a Hub token")
            self.settings["twarga_lab_proxy"] = ProxyTarget(
                self.service_url, token, owner=os.environ.get("JUPYTERHUB_USER", "")
            )
            self.log.info("Twarga Lab: forwarding /twarga/api to %s", self.service_url)
            return
        self.services = self.make_services()
        self.settings["twarga_lab_max_body_bytes"] = self.max_body_bytes
        if self.resolved_mode == "service":
            # Read before the HTTP server is made (it is, after extensions load).
            self.serverapp.max_body_size = min(
                self.serverapp.max_body_size, self.max_http_body_bytes
            )
        if self.resolved_mode == "service" and os.environ.get("JUPYTERHUB_API_URL"):
            self.services.hub_users = HubUserDirectory(
                os.environ["JUPYTERHUB_API_URL"], os.environ.get("JUPYTERHUB_API_TOKEN", "")
            )
            self.services.labs.hub = self.services.hub_users  # groups and instructors
        self.settings["twarga_lab_services"] = self.services
        self.settings["twarga_lab_consoles"] = VMConsoleManager(parent=self)
        self.log.info(
            "Twarga Lab: libvirt %s, domain type %s, database %s",
            self.libvirt_uri,
            self.services.vms.settings.domain_type,
            # The URL may hold a PostgreSQL password: the log shows "***" instead.
            make_url(self.db_url).render_as_string(hide_password=True),
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend(PROXY_ROUTES if self.resolved_mode == "proxy" else ROUTES)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.services is not None:
            await self.services.vms.start_up()
            await self.services.syslog.start()
            await self.services.labs.start()
            self.services.meter.start()
            if self.services.idle is not None:
                self.services.idle.start()
            self.settings["twarga_lab_consoles"].start_culler()
            self.services.metrics.start()

    async def stop_extension(self) -> None:
        if self.services is None:
            return
        await self.services.meter.stop()
        await self.services.labs.stop()
        if self.services.idle is not None:
            await self.services.idle.stop()
        await self.settings["twarga_lab_consoles"].shutdown()
        await self.services.metrics.stop()
        await self.services.syslog.stop()
        await self.services.vms.shut_down()
        if self.services.hub_users is not None:
            await self.services.hub_users.close()
        self.services.backend.close()
        self.services.db.dispose()
