"""The ``twarga-lab`` command: run, image build/add/list, upgrade-db, probe."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from twarga_lab.errors import DatabaseOutdated, TwargaError

TINY_TARGET = "twarga-tiny"
DEBIAN_TARGETS = ("debian-12",)  # twarga_lab.virt.debian.RECIPES, without importing it


def _settings(args: argparse.Namespace) -> object:
    """A TwargaLabApp with the command line's overrides, for its resolved defaults."""
    from twarga_lab.app import TwargaLabApp

    app = TwargaLabApp()
    for key in ("vms_dir", "images_dir", "db_url", "libvirt_uri"):
        value = getattr(args, key, None)
        if value:
            setattr(app, key, value)
    return app


def cmd_run(args: argparse.Namespace) -> int:
    """Serve JupyterLab with Twarga Lab on ``--ip``:``--port``, printing URL and token."""
    app = _settings(args)
    token = os.environ.get("TWARGA_TOKEN") or secrets.token_hex(24)
    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or "jupyter"
    argv = [
        jupyter,
        "lab",
        "--no-browser",
        f"--ip={args.ip}",
        f"--port={args.port}",
        "--ServerApp.port_retries=0",
        f"--TwargaLabApp.vms_dir={app.vms_dir}",  # type: ignore[attr-defined]
        f"--TwargaLabApp.images_dir={app.images_dir}",  # type: ignore[attr-defined]
        f"--TwargaLabApp.libvirt_uri={app.libvirt_uri}",  # type: ignore[attr-defined]
    ]
    # Secrets go through the environment: every local account can read /proc/*/cmdline.
    os.environ["JUPYTER_TOKEN"] = token
    os.environ["TWARGA_DB_URL"] = app.db_url  # type: ignore[attr-defined]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    argv.extend(args.extra)
    url = f"http://{args.ip}:{args.port}/lab?token={token}"
    print(f"Twarga Lab is starting at {url}", flush=True)
    print(
        f"  API: curl -H 'Authorization: token {token}' "
        f"http://{args.ip}:{args.port}/twarga/api/vms",
        flush=True,
    )
    os.execv(argv[0], argv)
    return 0  # not reached


def cmd_image_build(args: argparse.Namespace) -> int:
    """Build the default image (and probe KVM once), or a Debian image (``debian-12``)."""
    from twarga_lab.virt.images import ImageStore

    app = _settings(args)
    if args.target != TINY_TARGET:
        return _build_debian(args, Path(app.images_dir))  # type: ignore[attr-defined]
    store = ImageStore(Path(app.images_dir))  # type: ignore[attr-defined]
    image = store.build_tiny(force=args.force)
    print(f"image {image.name}: kernel {image.kernel_version}, {image.initrd}")
    if args.probe:
        print(f"domain type: {app.resolved_domain_type()}")  # type: ignore[attr-defined]
    return 0


def _build_debian(args: argparse.Namespace, images_dir: Path) -> int:
    """``image build debian-12``: mmdebstrap from this machine's apt sources, cached."""
    from twarga_lab.virt.debian import RECIPES, DebianImageBuilder, Progress

    recipe = RECIPES[args.target]
    sources = [Path(p) for p in args.apt_sources] if args.apt_sources else None
    builder = DebianImageBuilder(
        images_dir, recipe, apt_sources=sources, progress=Progress(recipe.key, quiet=args.quiet)
    )
    result = builder.build(force=args.force)
    if result.built:
        print(
            f"image {result.image}: built in {result.seconds:.0f} s, "
            f"{result.size_bytes / 2**20:.0f} MiB in {result.folder}"
        )
    else:
        print(f"{result.image} is up to date (recipe {recipe.digest()[:12]}) in {result.folder}")
    return 0


def cmd_image_add(args: argparse.Namespace) -> int:
    """Register a local qcow2 cloud image."""
    from twarga_lab.virt.images import ImageStore

    app = _settings(args)
    store = ImageStore(Path(app.images_dir))  # type: ignore[attr-defined]
    image = store.add_disk_image(
        args.name, Path(args.file), os_type=args.os_type, description=args.description
    )
    print(json.dumps(image.to_json(), indent=2))
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    """Print the bootable images as JSON."""
    from twarga_lab.virt.images import ImageStore

    app = _settings(args)
    store = ImageStore(Path(app.images_dir))  # type: ignore[attr-defined]
    print(json.dumps([i.to_json() for i in store.list()], indent=2))
    return 0


def cmd_upgrade_db(args: argparse.Namespace) -> int:
    """Migrate the database to the newest schema."""
    from twarga_lab.db.session import upgrade_db

    app = _settings(args)
    Path(app.vms_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
    revision = upgrade_db(app.db_url, args.revision)  # type: ignore[attr-defined]
    print(f"database is at revision {revision}")
    return 0


def cmd_create_admin(args: argparse.Namespace) -> int:
    """Create the first admin's Hub account; the password is printed once."""
    from twarga_lab.db import Database
    from twarga_lab.services.accounts import AccountService

    app = _settings(args)
    Path(app.vms_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[attr-defined]
    password = os.environ.get("TWARGA_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
    db = Database(app.db_url).open()  # type: ignore[attr-defined]
    try:
        created = AccountService(db).ensure_admin(args.name, password)
    finally:
        db.dispose()
    if not created:
        print(f"admin account {args.name} exists already (password unchanged)")
    elif os.environ.get("TWARGA_ADMIN_PASSWORD"):
        print(f"admin account {args.name} created with $TWARGA_ADMIN_PASSWORD")
    else:
        print(f"admin account {args.name} created; its password (shown once): {password}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """Print the domain type ``auto`` resolves to on this host."""
    app = _settings(args)
    print(app.resolved_domain_type())  # type: ignore[attr-defined]
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twarga-lab", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--vms-dir", dest="vms_dir", help="runtime storage (default ./vms)")
    common.add_argument("--images-dir", dest="images_dir", help="images (default VMS_DIR/images)")
    common.add_argument("--db-url", dest="db_url", help="SQLAlchemy database URL")
    common.add_argument("--libvirt-uri", dest="libvirt_uri", help="libvirt URI")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="serve JupyterLab with Twarga Lab")
    run.add_argument("--ip", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8888)
    run.add_argument("extra", nargs=argparse.REMAINDER, help="more jupyter lab arguments")
    run.set_defaults(fn=cmd_run)

    image = sub.add_parser("image", help="manage bootable images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser(
        "build", parents=[common], help="build twarga/tiny, or debian-12 from Debian's archive"
    )
    build.add_argument(
        "target", nargs="?", default=TINY_TARGET, choices=[TINY_TARGET, *DEBIAN_TARGETS],
        help=f"what to build (default {TINY_TARGET})",
    )  # fmt: skip
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.add_argument("--no-probe", dest="probe", action="store_false", help="skip the KVM probe")
    build.add_argument(
        "--apt-sources", action="append", metavar="FILE",
        help="apt sources file for a Debian image (repeatable; default: this machine's "
        "/etc/apt/sources.list.d/debian.sources and /etc/apt/sources.list)",
    )  # fmt: skip
    build.add_argument("--quiet", action="store_true", help="no progress on stderr")
    build.set_defaults(fn=cmd_image_build)
    add = image_sub.add_parser("add", parents=[common], help="register a qcow2 cloud image")
    add.add_argument("name", help="image name, e.g. debian/12")
    add.add_argument("file", help="path to a local qcow2 cloud image")
    add.add_argument("--os-type", default="linux")
    add.add_argument("--description", default="")
    add.set_defaults(fn=cmd_image_add)
    listing = image_sub.add_parser("list", parents=[common], help="list images")
    listing.set_defaults(fn=cmd_image_list)

    upgrade = sub.add_parser("upgrade-db", parents=[common], help="migrate the database")
    upgrade.add_argument("--revision", default="head")
    upgrade.set_defaults(fn=cmd_upgrade_db)

    admin = sub.add_parser("create-admin", parents=[common], help="create the first Hub admin")
    admin.add_argument("--name", default=os.environ.get("TWARGA_ADMIN_USER", "admin"))
    admin.set_defaults(fn=cmd_create_admin)

    probe = sub.add_parser("probe", parents=[common], help="print the resolved domain type")
    probe.set_defaults(fn=cmd_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``twarga-lab``."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (TwargaError, DatabaseOutdated) as e:
        print(f"twarga-lab: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
