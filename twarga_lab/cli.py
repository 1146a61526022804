"""The ``twarga-lab`` command: run, image build/add/list, upgrade-db, create-admin, probe.

Each (sub)command is a traitlets ``Application``. Twarga's settings are not declared here
again: ``--vms-dir``, ``--images-dir``, ``--db-url`` and ``--libvirt-uri`` are aliases of
``TwargaLabApp``'s traits, and ``--TwargaLabApp.<setting>=<value>`` sets any other one. The
settings are resolved like the server resolves them: the trait defaults (``$TWARGA_*``),
then the Jupyter config files on the Jupyter config path (``jupyter_config``,
``jupyter_server_config``, ``jupyter_twarga_lab_config``), then the command line.

Why it is long: the command line users already type must keep working exactly (positionals
among options, unique prefixes, run's pass-through to jupyter lab), which traitlets'
loader alone does not do, so a small argument scanner sits next to the commands it serves.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from jupyter_core.paths import jupyter_config_dir, jupyter_config_path
from sqlalchemy.engine import make_url
from traitlets import Bool, Int, List, TraitError, Unicode, default
from traitlets.config import Application, ArgumentError, KVArgParseConfigLoader

from twarga_lab.app import TwargaLabApp
from twarga_lab.errors import DatabaseOutdated, TwargaError

PROG = "twarga-lab"
TINY_TARGET = "twarga-tiny"
DEBIAN_TARGETS = ("debian-12",)  # twarga_lab.virt.debian.RECIPES, without importing it

#: The command-line spellings of TwargaLabApp's path and connection settings.
SETTING_ALIASES = {
    "vms-dir": "TwargaLabApp.vms_dir",
    "images-dir": "TwargaLabApp.images_dir",
    "db-url": "TwargaLabApp.db_url",
    "libvirt-uri": "TwargaLabApp.libvirt_uri",
}
#: The config files a Jupyter server with Twarga Lab reads TwargaLabApp's settings from,
#: lowest priority first (the extension's own file last).
CONFIG_FILES = ("jupyter_config", "jupyter_server_config", "jupyter_twarga_lab_config")
HELP_OPTIONS = ("-h", "--help", "--help-all")
#: ``--Class.trait`` (traitlets' own pattern for class options).
CLASS_OPTION = re.compile(r"^[A-Za-z]\w*(\.\w+)+$")
NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


class UsageError(Exception):
    """A bad command line: one line on stderr and exit status 2."""

    def __init__(self, message: str, prog: str = PROG) -> None:
        super().__init__(message)
        self.prog = prog


@dataclass(frozen=True)
class Positional:
    """A positional argument of a command; ``default=None`` makes it required."""

    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] = ()


def config_paths() -> list[str]:
    """Where Jupyter looks for config files, highest priority first (as ``JupyterApp``)."""
    paths = jupyter_config_path()
    if jupyter_config_dir() not in paths:
        paths.insert(0, jupyter_config_dir())
    return paths


def twarga_configurables() -> list[type[Any]]:
    """The configurable classes TwargaLabApp documents besides itself (its services),
    without the Jupyter server's."""
    return [c for c in TwargaLabApp.classes if c.__module__.startswith("twarga_lab.")]


class Command(Application):
    """A ``twarga-lab`` (sub)command: options are aliases of traits, positionals are
    declared in ``positionals``, and a bad command line is a :class:`UsageError`."""

    name = PROG
    aliases: ClassVar[dict[str, Any]] = dict(SETTING_ALIASES)
    flags: ClassVar[dict[str, Any]] = {}
    positionals: ClassVar[tuple[Positional, ...]] = ()
    #: The first positional argument (or ``--``) and everything after it are not parsed:
    #: they are kept in ``remainder`` for another program.
    takes_remainder: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.classes = [type(self), TwargaLabApp, *twarga_configurables()]
        self.arguments: dict[str, str] = {}
        self.remainder: list[str] = []
        self.exit_code = 0

    def fail(self, message: str) -> UsageError:
        return UsageError(message, self.name)

    # -- the command line --------------------------------------------------------------
    def initialize(self, argv: list[str] | None = None) -> None:  # type: ignore[override]
        self.parse_command_line(argv)

    def initialize_subcommand(self, subc: str, argv: list[str] | None = None) -> None:  # type: ignore[override]
        # A fresh subcommand each time (traitlets' default makes it a singleton, which
        # would keep one call's options for the next call in the same process).
        command = self.subcommands[subc][0](parent=self)
        self.subapp = command
        command.initialize(argv)

    def parse_command_line(self, argv: list[str] | None = None) -> None:  # type: ignore[override]
        argv = list(sys.argv[1:] if argv is None else argv)
        self.argv = argv
        if argv[:1] == ["help"]:  # `twarga-lab help image` is `twarga-lab image --help`
            argv = [*argv[1:], "--help"]
        if self.subcommands:
            if argv and argv[0] in self.subcommands:
                self.initialize_subcommand(argv[0], argv[1:])
                return
            if any(arg in HELP_OPTIONS for arg in argv[:1]):
                self.print_help("--help-all" in argv[:1])
                self.exit(0)
            names = ", ".join(self.subcommands)
            if not argv or argv[0].startswith("-"):
                raise self.fail(f"a command is required: {names}")
            raise self.fail(f"invalid command {argv[0]!r} (choose from {names})")
        options, positionals = self.split_arguments(argv)
        if any(arg in HELP_OPTIONS for arg in options):
            self.print_help("--help-all" in options)
            self.exit(0)
        flags, aliases = self.flatten_flags()
        classes = list(self._classes_with_config_traits())
        loader = KVArgParseConfigLoader(options, aliases, flags, classes=classes, log=self.log)
        try:
            self.cli_config = deepcopy(loader.load_config())
        except ArgumentError as e:
            raise self.fail(self.explain(e)) from None
        try:
            self.update_config(self.cli_config)
        except TraitError as e:
            raise self.fail(str(e)) from None
        self.arguments = self.bind_positionals(positionals)

    def option_names(self) -> tuple[set[str], set[str]]:
        """The ``--name`` options without and with a value (aliases)."""
        return set(self.flags), {key for key in self.aliases if key not in self.flags}

    def split_arguments(self, argv: list[str]) -> tuple[list[str], list[str]]:
        """Options (for traitlets' loader) and positionals; unknown options are errors.

        Like argparse: an option may be a unique prefix of its name, ``--`` ends the
        options, and options and positionals may come in any order.
        """
        flag_names, value_names = self.option_names()
        classes = {cls.__name__: cls for cls in self._classes_with_config_traits()}
        options: list[str] = []
        positionals: list[str] = []
        i = 0
        while i < len(argv):
            arg = argv[i]
            if arg == "--" or not arg.startswith("-") or arg == "-":
                if self.takes_remainder:
                    self.remainder = argv[i:]
                    break
                if arg == "--":
                    positionals.extend(argv[i + 1 :])
                    break
                positionals.append(arg)
                i += 1
                continue
            if arg in HELP_OPTIONS:
                options.append(arg)
                i += 1
                continue
            key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
            if CLASS_OPTION.match(key):
                cls_name, _, trait = key.rpartition(".")
                if cls_name not in classes or trait not in classes[cls_name].class_traits(
                    config=True
                ):
                    raise self.fail(f"unrecognized arguments: {arg}")
                takes_value = True
            else:
                key = self.expand(key, arg, flag_names | value_names)
                takes_value = key in value_names
                if not takes_value and eq:
                    raise self.fail(f"argument --{key}: ignored explicit argument {value!r}")
            if not takes_value:
                options.append(f"--{key}")
                i += 1
            elif eq:
                options.append(f"--{key}={value}")
                i += 1
            else:
                following = argv[i + 1] if i + 1 < len(argv) else None
                if following is None or (
                    following.startswith("-") and not NEGATIVE_NUMBER.match(following)
                ):
                    raise self.fail(f"argument --{key}: expected one argument")
                options.extend([f"--{key}", following])
                i += 2
        return options, positionals

    def expand(self, key: str, arg: str, names: set[str]) -> str:
        """The option ``key`` names, allowing a unique prefix (as argparse does)."""
        if key in names:
            return key
        matches = sorted(name for name in names if key and name.startswith(key))
        if len(matches) == 1:
            return matches[0]
        if matches:
            could = ", ".join(f"--{m}" for m in matches)
            raise self.fail(f"ambiguous option: {arg} could match {could}")
        raise self.fail(f"unrecognized arguments: {arg}")

    def explain(self, error: ArgumentError) -> str:
        """traitlets' loader error in the command line's own spelling."""
        message = str(error)
        found = re.match(r"Error loading argument (\w+(?:\.\w+)+)=(.*?), (.*)$", message, re.S)
        if not found:
            return " ".join(message.split())
        target, value, reason = found.groups()
        spelling = next((f"--{k}" for k, v in self.aliases.items() if v == target), None)
        cls_name, _, trait_name = target.rpartition(".")
        kind = "a"
        for cls in self._classes_with_config_traits():
            if cls.__name__ == cls_name and trait_name in cls.class_traits():
                kind = type(cls.class_traits()[trait_name]).__name__.lower()
        value = value.strip("[]'\"")
        reason = " ".join(reason.split())
        return f"argument {spelling or '--' + target}: invalid {kind} value: {value!r} ({reason})"

    def bind_positionals(self, values: list[str]) -> dict[str, str]:
        bound: dict[str, str] = {}
        missing = []
        for spec in self.positionals:
            if values:
                value = values.pop(0)
                if spec.choices and value not in spec.choices:
                    choices = ", ".join(repr(c) for c in spec.choices)
                    raise self.fail(
                        f"argument {spec.name}: invalid choice: {value!r} (choose from {choices})"
                    )
                bound[spec.name] = value
            elif spec.default is None:
                missing.append(spec.name)
            else:
                bound[spec.name] = spec.default
        if missing:
            raise self.fail(f"the following arguments are required: {', '.join(missing)}")
        if values:
            raise self.fail(f"unrecognized arguments: {' '.join(values)}")
        return bound

    def emit_description(self) -> Iterator[str]:
        usage = " ".join(
            [self.name, *(["<command>"] if self.subcommands else ["[options]"])]
            + [s.name if s.default is None else f"[{s.name}]" for s in self.positionals]
            + (["[jupyter lab arguments ...]"] if self.takes_remainder else [])
        )
        yield f"usage: {usage}"
        yield ""
        yield from super().emit_description()
        for spec in self.positionals:
            extra = f" (one of {', '.join(spec.choices)})" if spec.choices else ""
            yield f"{spec.name}: {spec.help}{extra}"
        if self.positionals:
            yield ""

    def emit_alias_help(self) -> Iterator[str]:
        """traitlets' alias help, where the settings' computed defaults (shown as
        ``''``) are replaced by their values here (environment and config files)."""
        resolved = self.resolved_defaults()
        target = None
        for line in super().emit_alias_help():
            if line.startswith("--"):
                target = self.aliases.get(line[2:].split("=")[0])
            if target in resolved and line.strip().startswith("Default:"):
                line = line.split("Default:")[0] + f"Default here: {resolved[target]}"
            yield line

    def resolved_defaults(self) -> dict[str, str]:
        try:
            app = self.settings()
        except UsageError:
            return {}
        values = {target: getattr(app, target.split(".")[1]) for target in SETTING_ALIASES.values()}
        db_url = "TwargaLabApp.db_url"
        values[db_url] = make_url(values[db_url]).render_as_string(hide_password=True)
        return values

    # -- running ------------------------------------------------------------------------
    def start(self) -> None:
        if self.subapp is not None:
            self.subapp.start()
            self.exit_code = self.subapp.exit_code  # type: ignore[attr-defined]
            return
        self.exit_code = self.execute()

    def execute(self) -> int:
        raise NotImplementedError  # each subcommand defines it; a group runs its subapp

    def settings(self) -> TwargaLabApp:
        """A TwargaLabApp resolved as the server resolves it: defaults and ``$TWARGA_*``,
        Jupyter config files, then this command line."""
        for basename in CONFIG_FILES:
            self.load_config_file(basename, path=config_paths())
        try:
            return TwargaLabApp(parent=self)
        except TraitError as e:
            raise self.fail(str(e)) from None


class RunCommand(Command):
    """Serve JupyterLab with Twarga Lab on --ip:--port, printing its URL and token.

    The first positional argument (or ``--``) and everything after it are passed on to
    ``jupyter lab``. $TWARGA_TOKEN is the token if set, else a random one."""

    name = f"{PROG} run"
    description = __doc__
    ip = Unicode("127.0.0.1", help="The address JupyterLab listens on.").tag(config=True)
    port = Int(8888, help="The port JupyterLab listens on.").tag(config=True)
    aliases: ClassVar[dict[str, Any]] = {
        **SETTING_ALIASES,
        "ip": "RunCommand.ip",
        "port": "RunCommand.port",
    }
    takes_remainder = True
    #: Always passed to jupyter lab (resolved here), or through the environment.
    PASSED = ("vms_dir", "images_dir", "libvirt_uri")
    #: Secrets go through the environment: every local account can read /proc/*/cmdline.
    ENVIRONMENT = {"db_url": "TWARGA_DB_URL", "metrics_scrape_token": "TWARGA_METRICS_SCRAPE_TOKEN"}

    def execute(self) -> int:
        app = self.settings()
        token = os.environ.get("TWARGA_TOKEN") or secrets.token_hex(24)
        jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or "jupyter"
        argv = [
            jupyter,
            "lab",
            "--no-browser",
            f"--ip={self.ip}",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            *(f"--TwargaLabApp.{name}={getattr(app, name)}" for name in self.PASSED),
        ]
        # Other Twarga settings of this command line reach the server too.
        for section, values in sorted(self.cli_config.items()):
            if section == type(self).__name__:
                continue
            for name in sorted(values):
                if section == "TwargaLabApp" and (name in self.PASSED or name in self.ENVIRONMENT):
                    continue
                value = getattr(app, name) if section == "TwargaLabApp" else values[name]
                if isinstance(value, (dict, list, tuple, set)):
                    raise self.fail(
                        f"--{section}.{name} cannot be passed on by run; "
                        "set it in jupyter_twarga_lab_config.py"
                    )
                argv.append(f"--{section}.{name}={value}")
        os.environ["JUPYTER_TOKEN"] = token
        os.environ["TWARGA_DB_URL"] = app.db_url
        if "metrics_scrape_token" in self.cli_config.get("TwargaLabApp", {}):
            os.environ["TWARGA_METRICS_SCRAPE_TOKEN"] = app.metrics_scrape_token
        if os.geteuid() == 0:
            argv.append("--allow-root")
        argv.extend(self.remainder)
        url = f"http://{self.ip}:{self.port}/lab?token={token}"
        print(f"Twarga Lab is starting at {url}", flush=True)
        print(
            f"  API: curl -H 'Authorization: token {token}' "
            f"http://{self.ip}:{self.port}/twarga/api/vms",
            flush=True,
        )
        os.execv(argv[0], argv)
        return 0  # not reached


class ImageBuildCommand(Command):
    """Build the default image twarga/tiny (and probe KVM once), or debian/12 from
    Debian's archive with mmdebstrap (``debian-12``); both are cached."""

    name = f"{PROG} image build"
    description = __doc__
    positionals = (
        Positional(
            "target",
            f"what to build (default {TINY_TARGET})",
            default=TINY_TARGET,
            choices=(TINY_TARGET, *DEBIAN_TARGETS),
        ),
    )
    force = Bool(False, help="Rebuild even if present.").tag(config=True)
    probe = Bool(True, help="Probe KVM after building twarga/tiny.").tag(config=True)
    quiet = Bool(False, help="No progress on stderr.").tag(config=True)
    apt_sources = List(
        Unicode(),
        help="apt sources file for a Debian image (repeatable; default: this machine's "
        "/etc/apt/sources.list.d/debian.sources and /etc/apt/sources.list).",
    ).tag(config=True)
    aliases: ClassVar[dict[str, Any]] = {
        **SETTING_ALIASES,
        "apt-sources": "ImageBuildCommand.apt_sources",
    }
    flags: ClassVar[dict[str, Any]] = {
        "force": ({"ImageBuildCommand": {"force": True}}, "rebuild even if present"),
        "no-probe": ({"ImageBuildCommand": {"probe": False}}, "skip the KVM probe"),
        "quiet": ({"ImageBuildCommand": {"quiet": True}}, "no progress on stderr"),
    }

    def execute(self) -> int:
        from twarga_lab.virt.images import ImageStore

        app = self.settings()
        if self.arguments["target"] != TINY_TARGET:
            return self.build_debian(Path(app.images_dir))
        image = ImageStore(Path(app.images_dir)).build_tiny(force=self.force)
        print(f"image {image.name}: kernel {image.kernel_version}, {image.initrd}")
        if self.probe:
            print(f"domain type: {app.resolved_domain_type()}")
        return 0

    def build_debian(self, images_dir: Path) -> int:
        from twarga_lab.virt.debian import RECIPES, DebianImageBuilder, Progress

        recipe = RECIPES[self.arguments["target"]]
        sources = [Path(p) for p in self.apt_sources] if self.apt_sources else None
        builder = DebianImageBuilder(
            images_dir, recipe, apt_sources=sources, progress=Progress(recipe.key, quiet=self.quiet)
        )
        result = builder.build(force=self.force)
        if result.built:
            print(
                f"image {result.image}: built in {result.seconds:.0f} s, "
                f"{result.size_bytes / 2**20:.0f} MiB in {result.folder}"
            )
        else:
            print(
                f"{result.image} is up to date (recipe {recipe.digest()[:12]}) in {result.folder}"
            )
        return 0


class ImageAddCommand(Command):
    """Register a local qcow2 cloud image; prints the image as JSON."""

    name = f"{PROG} image add"
    description = __doc__
    positionals = (
        Positional("name", "image name, e.g. debian/12"),
        Positional("file", "path to a local qcow2 cloud image"),
    )
    os_type = Unicode("linux", help="The image's operating system type.").tag(config=True)
    image_description = Unicode("", help="A description of the image.").tag(config=True)
    aliases: ClassVar[dict[str, Any]] = {
        **SETTING_ALIASES,
        "os-type": "ImageAddCommand.os_type",
        "description": "ImageAddCommand.image_description",
    }

    def execute(self) -> int:
        from twarga_lab.virt.images import ImageStore

        store = ImageStore(Path(self.settings().images_dir))
        image = store.add_disk_image(
            self.arguments["name"],
            Path(self.arguments["file"]),
            os_type=self.os_type,
            description=self.image_description,
        )
        print(json.dumps(image.to_json(), indent=2))
        return 0


class ImageListCommand(Command):
    """Print the bootable images as JSON."""

    name = f"{PROG} image list"
    description = __doc__

    def execute(self) -> int:
        from twarga_lab.virt.images import ImageStore

        store = ImageStore(Path(self.settings().images_dir))
        print(json.dumps([i.to_json() for i in store.list()], indent=2))
        return 0


class ImageCommand(Command):
    """Manage bootable images."""

    name = f"{PROG} image"
    description = __doc__
    subcommands = {
        "build": (ImageBuildCommand, "build twarga/tiny, or debian-12 from Debian's archive"),
        "add": (ImageAddCommand, "register a qcow2 cloud image"),
        "list": (ImageListCommand, "list images"),
    }


class UpgradeDBCommand(Command):
    """Migrate Twarga's database (TwargaLabApp.db_url) to the newest schema; back it up
    first."""

    name = f"{PROG} upgrade-db"
    description = __doc__
    revision = Unicode("head", help="The schema revision to migrate to.").tag(config=True)
    aliases: ClassVar[dict[str, Any]] = {**SETTING_ALIASES, "revision": "UpgradeDBCommand.revision"}

    def execute(self) -> int:
        from twarga_lab.db.session import upgrade_db

        app = self.settings()
        Path(app.vms_dir).mkdir(parents=True, exist_ok=True)
        revision = upgrade_db(app.db_url, self.revision)
        print(f"database is at revision {revision}")
        return 0


class CreateAdminCommand(Command):
    """Create the first admin's Hub account. The password is $TWARGA_ADMIN_PASSWORD, or a
    random one printed once; an existing account is left as it is."""

    name = f"{PROG} create-admin"
    description = __doc__
    admin_name = Unicode(help="The admin's user name ($TWARGA_ADMIN_USER, else admin).").tag(
        config=True
    )

    @default("admin_name")
    def _default_admin_name(self) -> str:
        return os.environ.get("TWARGA_ADMIN_USER", "admin")

    aliases: ClassVar[dict[str, Any]] = {**SETTING_ALIASES, "name": "CreateAdminCommand.admin_name"}

    def execute(self) -> int:
        from twarga_lab.db import Database
        from twarga_lab.services.accounts import AccountService

        app = self.settings()
        Path(app.vms_dir).mkdir(parents=True, exist_ok=True)
        password = os.environ.get("TWARGA_ADMIN_PASSWORD") or secrets.token_urlsafe(12)
        db = Database(app.db_url).open()
        try:
            created = AccountService(db).ensure_admin(self.admin_name, password)
        finally:
            db.dispose()
        name = self.admin_name
        if not created:
            print(f"admin account {name} exists already (password unchanged)")
        elif os.environ.get("TWARGA_ADMIN_PASSWORD"):
            print(f"admin account {name} created with $TWARGA_ADMIN_PASSWORD")
        else:
            print(f"admin account {name} created; its password (shown once): {password}")
        return 0


class ProbeCommand(Command):
    """Print the domain type TwargaLabApp.domain_type ``auto`` resolves to on this host."""

    name = f"{PROG} probe"
    description = __doc__

    def execute(self) -> int:
        print(self.settings().resolved_domain_type())
        return 0


class TwargaLabCommand(Command):
    """Twarga Lab: real VMs over libvirt, credits, metrics and a SOC inside Jupyter.

    Settings are TwargaLabApp's, read as the server reads them ($TWARGA_* defaults, the
    Jupyter config files, e.g. jupyter_twarga_lab_config.py) and overridden by options
    such as --vms-dir or --TwargaLabApp.<setting>=<value>. `twarga-lab <command> --help`
    shows a command's options."""

    name = PROG
    description = __doc__
    subcommands = {
        "run": (RunCommand, "serve JupyterLab with Twarga Lab"),
        "image": (ImageCommand, "manage bootable images (build, add, list)"),
        "upgrade-db": (UpgradeDBCommand, "migrate the database"),
        "create-admin": (CreateAdminCommand, "create the first Hub admin"),
        "probe": (ProbeCommand, "print the resolved domain type"),
    }
    examples = """
twarga-lab image build --images-dir ./vms/images
twarga-lab image build debian-12 --force
twarga-lab image list
twarga-lab upgrade-db --db-url postgresql+psycopg://twarga@localhost/twarga
TWARGA_ADMIN_PASSWORD=... twarga-lab create-admin --name admin
twarga-lab run --port 8888 --vms-dir ./vms
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``twarga-lab``: the exit status (2 for a bad command line or a
    Twarga error, each told in one line on stderr)."""
    command = TwargaLabCommand()
    try:
        command.initialize(argv)
        command.start()
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except (TwargaError, DatabaseOutdated) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    return command.exit_code


if __name__ == "__main__":
    sys.exit(main())
