"""The Twarga Lab server extension: every setting is a documented trait; services are
built in ``initialize_settings``, routes registered in ``initialize_handlers`` and
everything is torn down in ``stop_extension``."""

from __future__ import annotations

import asyncio
import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jupyter_server.extension.application import ExtensionApp
from sqlalchemy.engine import make_url
from traitlets import Dict, Enum, Float, Int, TraitError, Unicode, default, observe, validate

from twarga_lab.db import Database
from twarga_lab.handlers import ROUTES
from twarga_lab.handlers.proxy import PROXY_ROUTES, ProxyTarget
from twarga_lab.services import Identity
from twarga_lab.services.bans import BanPolicy
from twarga_lab.services.consoles import ConsoleService, VMConsoleManager
from twarga_lab.services.credits import CreditMeter, CreditRates, CreditService
from twarga_lab.services.hubusers import HubUserDirectory
from twarga_lab.services.metric_store import Retention
from twarga_lab.services.metrics import MetricsConfig, MetricsService, Thresholds
from twarga_lab.services.snapshots import SnapshotService
from twarga_lab.services.soc import SocService
from twarga_lab.services.syslog import (
    SyslogCollector,
    SyslogConfig,
    SyslogService,
    TrustedSources,
    parse_address,
)
from twarga_lab.services.users import QuotaDefaults, UserService
from twarga_lab.services.vms import VMBounds, VMService, VMServiceConfig
from twarga_lab.virt.backend import HypervisorBackend
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

    hub_users: HubUserDirectory | None = None  # service mode under a Hub only

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

    default_image = Unicode(TINY_IMAGE, help="The image a VM gets when none is named.").tag(
        config=True
    )

    stop_timeout = Float(
        30.0, help="Seconds a guest gets to power off after the ACPI button before it is forced."
    ).tag(config=True)

    min_ram_mb = Int(512, help="Smallest RAM a VM may have, in MB.").tag(config=True)
    max_ram_mb = Int(4096, help="Largest RAM a VM may have, in MB.").tag(config=True)
    min_cpu = Int(1, help="Fewest vCPUs a VM may have.").tag(config=True)
    max_cpu = Int(4, help="Most vCPUs a VM may have.").tag(config=True)
    min_disk_gb = Int(10, help="Smallest disk a VM may have, in GB.").tag(config=True)
    max_disk_gb = Int(100, help="Largest disk a VM may have, in GB.").tag(config=True)

    max_vms_per_user = Int(5, help="Default quota: VMs per user (destroyed ones not counted).").tag(
        config=True
    )
    max_snapshots_per_vm = Int(
        5, help="Most snapshots one VM may have (taking one more is 409 quota_exceeded)."
    ).tag(config=True)
    max_ram_per_user_mb = Int(8192, help="Default quota: total RAM of a user's VMs, in MB.").tag(
        config=True
    )

    starting_credits = Float(1000.0, help="Credits every new user starts with.").tag(config=True)
    credits_per_vcpu_hour = Float(
        10.0, help="Credits a running VM costs per vCPU and hour (charged every minute)."
    ).tag(config=True)
    credits_per_gb_ram_hour = Float(
        5.0, help="Credits a running VM costs per GB of RAM and hour (charged every minute)."
    ).tag(config=True)
    metering_interval = Float(
        60.0, help="Seconds between two charges of running VMs; at zero credits they stop."
    ).tag(config=True)

    metrics_interval = Float(
        10.0,
        help="""Seconds between two metric collections: the host (psutil) and the state and
        CPU time of every VM in one bulk libvirt call.""",
    ).tag(config=True)
    metrics_slow_interval = Float(
        30.0,
        help="""Seconds between two reads of the VMs' memory, disk and network counters (a
        heavier libvirt call; 30-60 s is sensible).""",
    ).tag(config=True)

    @validate("metrics_interval", "metrics_slow_interval")
    def _validate_metrics_interval(self, proposal: Any) -> float:
        if proposal["value"] <= 0:
            raise TraitError(f"{proposal['trait'].name} must be positive")
        return float(proposal["value"])

    metrics_raw_retention_hours = Float(
        24.0, help="Hours raw metric samples are kept (24 h windows read them)."
    ).tag(config=True)
    metrics_minute_retention_days = Float(
        7.0, help="Days 1-minute metric rollups (average, minimum, maximum) are kept."
    ).tag(config=True)
    metrics_hour_retention_days = Float(
        90.0, help="Days 1-hour metric rollups are kept; also the longest history window."
    ).tag(config=True)
    metrics_prune_interval = Float(
        600.0, help="Seconds between two deletions of metrics past their retention."
    ).tag(config=True)
    metrics_cpu_threshold = Float(
        90.0, help="CPU usage (%) of the host or a VM that raises a warning event."
    ).tag(config=True)
    metrics_memory_threshold = Float(
        90.0, help="Memory usage (%) of the host or a VM that raises a warning event."
    ).tag(config=True)
    metrics_disk_threshold = Float(
        90.0, help="Disk usage (%) of the host or a VM that raises a warning event."
    ).tag(config=True)
    metrics_threshold_seconds = Float(
        60.0,
        help="""Seconds a value must stay above its threshold before the warning event, and
        at or below it before the recovery event (one event each way).""",
    ).tag(config=True)
    metrics_scrape_token = Unicode(
        help="""Bearer token a Prometheus server sends to ``GET /twarga/metrics``
        (``Authorization: Bearer <token>``). Empty: only admins may read the exposition.""",
    ).tag(config=True)

    @default("metrics_scrape_token")
    def _default_metrics_scrape_token(self) -> str:
        return os.environ.get("TWARGA_METRICS_SCRAPE_TOKEN", "")

    ssh_port_min = Int(22000, help="First 127.0.0.1 port for VMs' SSH forwards.").tag(config=True)
    ssh_port_max = Int(22999, help="Last 127.0.0.1 port for VMs' SSH forwards.").tag(config=True)

    syslog_address = Unicode(
        "127.0.0.1:5514",
        help="""Where the SOC listens for syslog over UDP and TCP (RFC 3164/5424, RFC 6587
        framing), as ``IP:PORT``; empty turns the network receiver off. The tiny image's
        guests do not need it: each sends its syslog over its own virtio channel.""",
    ).tag(config=True)

    @validate("syslog_address")
    def _validate_syslog_address(self, proposal: Any) -> str:
        try:
            parse_address(proposal["value"])
        except ValueError as e:
            raise TraitError(str(e)) from None
        return str(proposal["value"]).strip()

    syslog_trusted_sources = Dict(
        {},
        help="""Network syslog senders allowed to speak for a VM, as ``{domain: [entry, ...]}``
        with the VM's libvirt domain name (the API's ``domain``) as key. An entry is an address
        or network (``"192.0.2.10"``, ``"10.1.0.0/24"``) or ``"secret:<16+ characters>"``,
        which a message carries as RFC 5424 structured data ``[twarga@32473
        secret="..."]``. Off (empty) by default: every account on the host can reach the
        receiver and write any hostname, so network messages are then never a VM's events,
        failure counts or bans (at most an unattributed system event for admins); a VM's
        own virtio channel needs no entry. Trust 127.0.0.1 only where no other account can
        run code on the host. Changes apply at once.""",
    ).tag(config=True)

    @validate("syslog_trusted_sources")
    def _validate_syslog_trusted_sources(self, proposal: Any) -> dict[str, Any]:
        try:
            TrustedSources(proposal["value"])
        except (ValueError, TypeError) as e:
            raise TraitError(str(e)) from None
        return dict(proposal["value"])

    @observe("syslog_trusted_sources")
    def _syslog_trusted_sources_changed(self, change: Any) -> None:
        if self.services is not None:
            self.services.syslog.set_trusted_sources(change["new"])

    syslog_source_queue_size = Int(
        2000,
        help="""Syslog lines one source (a VM's channel, or one sender address on the network)
        may have waiting; beyond it, and beyond its rate, its lines are dropped and counted
        (``twarga_syslog_dropped_lines_total``) with one warning event per flood burst, so a
        flooding source cannot delay the others.""",
    ).tag(config=True)
    syslog_source_rate = Float(
        200.0,
        help="""Lines a second one network sender may send (bursts of ten times as many);
        a VM's channel may send 1000 a second (bursts of 5000).""",
    ).tag(config=True)
    syslog_tcp_timeout = Float(
        60.0,
        help="""Seconds a TCP syslog connection may stay silent, or hold an unfinished
        message, before it is closed.""",
    ).tag(config=True)
    soc_event_retention_days = Float(
        90.0, help="Days SOC events are kept; older ones are deleted (in batches)."
    ).tag(config=True)
    soc_prune_interval = Float(
        3600.0,
        help="""Seconds between two prunings of old SOC events and of SSH failure counts
        older than ``bruteforce_findtime`` (which can no longer add up to a ban); 0: never.""",
    ).tag(config=True)

    bruteforce_maxretry = Int(
        5, help="SSH brute force on a VM: failures from one source that raise the alarm."
    ).tag(config=True)
    bruteforce_findtime = Float(
        600.0, help="SSH brute force on a VM: the window (seconds) the failures must fall in."
    ).tag(config=True)
    bruteforce_bantime = Float(
        600.0,
        help="SSH brute force on a VM: the first ban's length in seconds; each further ban of "
        "the same source doubles it (recorded, not enforced under user-mode networking).",
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

    console_idle_timeout = Float(
        1800.0, help="Seconds without input after which a VM console session is closed."
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

    def build_services(self, backend: HypervisorBackend | None = None) -> Services:
        """Open the database (refusing an outdated one) and build every service."""
        vms_dir = Path(self.vms_dir)
        vms_dir.mkdir(parents=True, exist_ok=True)
        if self.libvirt_uri.startswith("qemu:///system"):
            self.warn_if_unreachable(vms_dir)
        db = Database(self.db_url).open()
        backend = backend or LibvirtBackend(self.libvirt_uri)
        images = ImageStore(Path(self.images_dir))
        users = UserService(
            db,
            starting_credits=self.starting_credits,
            quota_defaults=QuotaDefaults(
                max_vms=self.max_vms_per_user, max_ram_mb=self.max_ram_per_user_mb
            ),
        )
        config = VMServiceConfig(
            vms_dir=vms_dir,
            domain_type=self.resolved_domain_type(),
            domain_prefix=self.domain_prefix,
            default_image=self.default_image,
            stop_timeout=self.stop_timeout,
            ssh_port_min=self.ssh_port_min,
            ssh_port_max=self.ssh_port_max,
            bounds=VMBounds(
                min_ram_mb=self.min_ram_mb,
                max_ram_mb=self.max_ram_mb,
                min_cpu=self.min_cpu,
                max_cpu=self.max_cpu,
                min_disk_gb=self.min_disk_gb,
                max_disk_gb=self.max_disk_gb,
            ),
        )
        vms = VMService(db, backend, images, users, config)
        credits = CreditService(
            db,
            users,
            CreditRates(
                per_vcpu_hour=self.credits_per_vcpu_hour,
                per_gb_ram_hour=self.credits_per_gb_ram_hour,
            ),
        )
        vms.billing = credits  # a VM that stops pays for its seconds since the last tick
        meter = CreditMeter(credits, vms, self.metering_interval)
        metrics = MetricsService(db, backend, self.metrics_config())
        soc = SocService(
            db,
            BanPolicy(
                maxretry=self.bruteforce_maxretry,
                findtime=self.bruteforce_findtime,
                bantime=self.bruteforce_bantime,
            ),
        )
        syslog = SyslogService(
            soc,
            db,
            backend,
            address=self.syslog_address,
            domain_prefix=self.domain_prefix,
            config=SyslogConfig(
                trusted_sources=self.syslog_trusted_sources,
                source_queue_size=self.syslog_source_queue_size,
                source_rate=self.syslog_source_rate,
                tcp_timeout=self.syslog_tcp_timeout,
                event_retention_days=self.soc_event_retention_days,
                prune_interval=self.soc_prune_interval,
            ),
        )
        metrics.registry.register(SyslogCollector(syslog))
        return Services(
            db,
            backend,
            images,
            users,
            vms,
            credits,
            meter,
            self.personal_user,
            metrics=metrics,
            soc=soc,
            syslog=syslog,
            consoles=ConsoleService(db, vms, self.libvirt_uri),
            snapshots=SnapshotService(db, backend, vms, self.max_snapshots_per_vm),
        )

    def metrics_config(self) -> MetricsConfig:
        """The metrics service's settings from the traits."""
        return MetricsConfig(
            interval=self.metrics_interval,
            slow_interval=self.metrics_slow_interval,
            prune_interval=self.metrics_prune_interval,
            domain_prefix=self.domain_prefix,
            disk_path=Path(self.vms_dir),
            retention=Retention(
                raw=self.metrics_raw_retention_hours * 3600,
                minute=self.metrics_minute_retention_days * 86400,
                hour=self.metrics_hour_retention_days * 86400,
            ),
            thresholds=Thresholds(
                cpu=self.metrics_cpu_threshold,
                memory=self.metrics_memory_threshold,
                disk=self.metrics_disk_threshold,
                hold_seconds=self.metrics_threshold_seconds,
            ),
            scrape_token=self.metrics_scrape_token,
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
        self.services = self.build_services()
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
        self.settings["twarga_lab_services"] = self.services
        self.settings["twarga_lab_consoles"] = VMConsoleManager(
            idle_timeout=self.console_idle_timeout
        )
        self.log.info(
            "Twarga Lab: libvirt %s, domain type %s, database %s",
            self.libvirt_uri,
            self.services.vms.config.domain_type,
            # The URL may hold a PostgreSQL password: the log shows "***" instead.
            make_url(self.db_url).render_as_string(hide_password=True),
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend(PROXY_ROUTES if self.resolved_mode == "proxy" else ROUTES)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.services is not None:
            await self.services.vms.start_up()
            await self.services.syslog.start()
            self.services.meter.start()
            self.settings["twarga_lab_consoles"].start_culler()
            self.services.metrics.start()

    async def stop_extension(self) -> None:
        if self.services is None:
            return
        await self.services.meter.stop()
        await self.settings["twarga_lab_consoles"].shutdown()
        await self.services.metrics.stop()
        await self.services.syslog.stop()
        await self.services.vms.shut_down()
        if self.services.hub_users is not None:
            await self.services.hub_users.close()
        self.services.backend.close()
        self.services.db.dispose()
