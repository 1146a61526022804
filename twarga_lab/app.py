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
from traitlets import Enum, Float, Int, Unicode, default, validate

from twarga_lab.db import Database
from twarga_lab.errors import ValidationFailed
from twarga_lab.handlers import ROUTES
from twarga_lab.handlers.proxy import PROXY_ROUTES, ProxyTarget
from twarga_lab.services import Identity
from twarga_lab.services.credits import CreditMeter, CreditRates, CreditService
from twarga_lab.services.hubusers import HubUserDirectory
from twarga_lab.services.users import QuotaDefaults, UserService
from twarga_lab.services.vms import VMBounds, VMService, VMServiceConfig
from twarga_lab.virt.backend import HypervisorBackend
from twarga_lab.virt.images import TINY_IMAGE, ImageStore
from twarga_lab.virt.libvirt_backend import LibvirtBackend
from twarga_lab.virt.probe import resolve_domain_type

T = TypeVar("T")
SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
)


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

    hub_users: HubUserDirectory | None = None

    async def identify(self, user: Any) -> Identity:
        """The Twarga identity of a Jupyter ``current_user``.

        Under JupyterHub the user carries the Hub's model; the admin flag comes from it or,
        when the token's scopes hide it, from the Hub's API. Otherwise this is personal
        mode, where the one person is the server's owner and an admin.
        """
        hub_user = getattr(user, "hub_user", None)
        if isinstance(hub_user, dict) and hub_user.get("name"):
            name = str(hub_user["name"])
            if "admin" in hub_user:
                return Identity(name=name, admin=bool(hub_user["admin"]))
            if self.hub_users is not None:
                return Identity(name=name, admin=await self.hub_users.is_admin(name))
            return Identity(name=name, admin=False)
        return Identity(name=self.personal_user, admin=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking service call in a worker thread."""
        return await asyncio.to_thread(fn, *args)

    @staticmethod
    def validate_ssh_key(key: str | None) -> str | None:
        """One OpenSSH public key line, or None to remove it."""
        if key is None or not key.strip():
            return None
        words = key.strip().split()
        if len(words) < 2 or words[0] not in SSH_KEY_TYPES or "\n" in key.strip():
            raise ValidationFailed(
                "ssh_public_key must be one OpenSSH public key line such as "
                "'ssh-ed25519 AAAA... me@laptop'",
                field="ssh_public_key",
                reason="invalid_ssh_key",
            )
        return " ".join(words)


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

    @default("vms_dir")
    def _default_vms_dir(self) -> str:
        return os.environ.get("TWARGA_VMS_DIR", "./vms")

    @validate("vms_dir")
    def _validate_vms_dir(self, proposal: Any) -> str:
        return str(Path(proposal["value"]).expanduser().absolute())

    images_dir = Unicode(
        help="Where bootable images live (``twarga-lab image build`` writes here). "
        "Defaults to ``<vms_dir>/images``.",
    ).tag(config=True)

    @default("images_dir")
    def _default_images_dir(self) -> str:
        return os.environ.get("TWARGA_IMAGES_DIR") or str(Path(self.vms_dir) / "images")

    @validate("images_dir")
    def _validate_images_dir(self, proposal: Any) -> str:
        return str(Path(proposal["value"]).expanduser().absolute())

    db_url = Unicode(
        help="SQLAlchemy URL of Twarga's database: SQLite (default, ``<vms_dir>/twarga.db``) "
        "or PostgreSQL (``postgresql+psycopg://user:pw@host/db``).",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        return os.environ.get("TWARGA_DB_URL") or f"sqlite:///{Path(self.vms_dir) / 'twarga.db'}"

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

    ssh_port_min = Int(22000, help="First 127.0.0.1 port for VMs' SSH forwards.").tag(config=True)
    ssh_port_max = Int(22999, help="Last 127.0.0.1 port for VMs' SSH forwards.").tag(config=True)

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
        meter = CreditMeter(credits, vms, self.metering_interval)
        return Services(db, backend, images, users, vms, credits, meter, self.personal_user)

    def initialize_settings(self) -> None:
        if self.resolved_mode == "proxy":
            token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
            if not self.service_url or not token:
                self.log.error("Twarga Lab proxy mode needs $TWARGA_SERVICE_URL and a Hub token")
            self.settings["twarga_lab_proxy"] = ProxyTarget(self.service_url, token)
            self.log.info("Twarga Lab: forwarding /twarga/api to %s", self.service_url)
            return
        self.services = self.build_services()
        if self.resolved_mode == "service" and os.environ.get("JUPYTERHUB_API_URL"):
            self.services.hub_users = HubUserDirectory(
                os.environ["JUPYTERHUB_API_URL"], os.environ.get("JUPYTERHUB_API_TOKEN", "")
            )
        self.settings["twarga_lab_services"] = self.services
        self.log.info(
            "Twarga Lab: libvirt %s, domain type %s, database %s",
            self.libvirt_uri,
            self.services.vms.config.domain_type,
            self.db_url,
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend(PROXY_ROUTES if self.resolved_mode == "proxy" else ROUTES)

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.services is not None:
            await self.services.vms.start_up()
            self.services.meter.start()

    async def stop_extension(self) -> None:
        if self.services is None:
            return
        await self.services.meter.stop()
        await self.services.vms.shut_down()
        if self.services.hub_users is not None:
            await self.services.hub_users.close()
        self.services.backend.close()
        self.services.db.dispose()
