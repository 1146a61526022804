"""The ``twarga-lab`` command, run as the installed entry point (``.venv/bin/twarga-lab``).

Its options are aliases of ``TwargaLabApp``'s traits, so a setting given on the command
line, in a Jupyter config file or in ``$TWARGA_*`` resolves as it does in the server.
Image builds are tested elsewhere; ``run`` (which execs ``jupyter lab``) is checked in
process with ``os.execv`` replaced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twarga_lab import cli
from twarga_lab.app import TwargaLabApp
from twarga_lab.db import Database
from twarga_lab.db.session import head_revision
from twarga_lab.services.accounts import AccountService

CLI = str(Path(sys.executable).parent / "twarga-lab")
TIMEOUT = 120


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment without Twarga settings and with an empty Jupyter config dir."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TWARGA_", "JUPYTER_"))}
    config = tmp_path / "jupyter-config"
    config.mkdir()
    return {**clean, "JUPYTER_CONFIG_DIR": str(config), "HOME": str(tmp_path / "home")}


def twarga_lab(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    return done.stdout


def sqlite(path: Path) -> str:
    return f"sqlite:///{path}"


# -- help -------------------------------------------------------------------------------


def test_the_top_level_help_lists_every_command(env):
    out = ok(twarga_lab("--help", env=env))
    for command in ("run", "image", "upgrade-db", "create-admin", "probe"):
        assert f"\n{command}\n" in out
    assert "twarga-lab image build debian-12 --force" in out  # the examples


def test_the_image_help_lists_its_commands(env):
    out = ok(twarga_lab("image", "--help", env=env))
    assert "usage: twarga-lab image <command>" in out
    for command in ("build", "add", "list"):
        assert f"\n{command}\n" in out


@pytest.mark.parametrize(
    ("argv", "usage", "options"),
    [
        (["run"], "twarga-lab run [options] [jupyter lab arguments ...]", ["--ip", "--port"]),
        (
            ["image", "build"],
            "twarga-lab image build [options] [target]",
            ["--force", "--no-probe", "--apt-sources", "--quiet", "twarga-tiny, debian-12"],
        ),
        (
            ["image", "add"],
            "twarga-lab image add [options] name file",
            ["--os-type", "--description"],
        ),
        (["image", "list"], "twarga-lab image list [options]", []),
        (["upgrade-db"], "twarga-lab upgrade-db [options]", ["--revision"]),
        (["create-admin"], "twarga-lab create-admin [options]", ["--name"]),
        (["probe"], "twarga-lab probe [options]", []),
    ],
)
def test_each_command_has_help_with_the_shared_settings(
    tmp_path, monkeypatch, capsys, argv, usage, options
):
    # In process (the entry point's --help is run above): the same main().
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("TWARGA_IMAGES_DIR", raising=False)
    monkeypatch.setenv("TWARGA_VMS_DIR", str(tmp_path / "from-env"))
    assert cli.main([*argv, "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"usage: {usage}\n")
    for option in ["--vms-dir", "--images-dir", "--db-url", "--libvirt-uri", *options]:
        assert option in out
    # The settings' help is TwargaLabApp's own, with the default resolved here.
    assert "Equivalent to: [--TwargaLabApp.vms_dir]" in out
    assert f"Default here: {tmp_path / 'from-env'}\n" in out
    assert f"Default here: {tmp_path / 'from-env' / 'images'}\n" in out


def test_help_never_shows_a_database_password(env):
    env["TWARGA_DB_URL"] = "postgresql+psycopg://twarga:s3cret-pw@127.0.0.1/twarga"
    out = ok(twarga_lab("upgrade-db", "--help", env=env))
    assert "postgresql+psycopg://twarga:***@127.0.0.1/twarga" in out
    assert "s3cret-pw" not in out


# -- bad command lines ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], "twarga-lab: error: a command is required: run, image, upgrade-db"),
        (["bogus"], "twarga-lab: error: invalid command 'bogus'"),
        (["image"], "twarga-lab image: error: a command is required: build, add, list"),
        (["probe", "--bogus"], "twarga-lab probe: error: unrecognized arguments: --bogus"),
        (["probe", "extra"], "twarga-lab probe: error: unrecognized arguments: extra"),
        (
            ["image", "list", "--TwargaLabApp.no_such_setting=1"],
            "twarga-lab image list: error: unrecognized arguments: --TwargaLabApp.no_such",
        ),
        (
            ["image", "build", "bogus"],
            "twarga-lab image build: error: argument target: invalid choice: 'bogus'",
        ),
        (["image", "build", "--force=yes"], "twarga-lab image build: error: argument --force"),
        (
            ["image", "add", "debian/12"],
            "twarga-lab image add: error: the following arguments are required: file",
        ),
        (
            ["upgrade-db", "--revision"],
            "twarga-lab upgrade-db: error: argument --revision: expected one argument",
        ),
        (["run", "--port", "abc"], "twarga-lab run: error: The 'port' trait"),
        (["run", "--i", "x"], "twarga-lab run: error: ambiguous option: --i could match"),
        (
            ["probe", "--TwargaLabApp.domain_type=xen"],
            "twarga-lab probe: error: The 'domain_type' trait of a TwargaLabApp instance",
        ),
    ],
)
def test_a_bad_command_line_is_one_line_on_stderr_and_status_2(capsys, argv, error):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(error), err
    assert err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], "twarga-lab: error: a command is required"),
        (["create-admin", "--nam"], "twarga-lab create-admin: error: argument --name: expected"),
        (["image", "list", "--bogus"], "twarga-lab image list: error: unrecognized arguments"),
    ],
)
def test_the_entry_point_exits_2_with_one_line_for_a_bad_command_line(env, argv, error):
    done = twarga_lab(*argv, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(error) and done.stderr.count("\n") == 1, done.stderr


def test_a_twarga_error_is_one_line_with_status_2(env, tmp_path):
    done = twarga_lab(
        "image", "add", "debian/12", str(tmp_path / "missing.qcow2"),
        "--images-dir", str(tmp_path / "images"), env=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == f"twarga-lab: no such file: {tmp_path / 'missing.qcow2'}\n"


# -- images -----------------------------------------------------------------------------


def test_image_list_of_an_empty_folder_is_an_empty_json_list(env, tmp_path):
    assert (
        ok(twarga_lab("image", "list", "--images-dir", str(tmp_path / "none"), env=env)) == "[]\n"
    )


def test_image_add_registers_a_qcow2_that_image_list_then_shows(env, tmp_path):
    disk = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    images = tmp_path / "images"
    argv = ["image", "add", "test/one", str(disk), "--os-type", "linux"]
    argv += ["--description=a test disk", f"--images-dir={images}"]
    out = ok(twarga_lab(*argv, env=env))
    assert '"name": "test/one"' in out and '"description": "a test disk"' in out
    assert (images / "test" / "one" / "base.qcow2").is_file()
    listed = ok(twarga_lab("image", "list", "--images-dir", str(images), env=env))
    assert '"name": "test/one"' in listed


# -- the database -----------------------------------------------------------------------


def test_upgrade_db_migrates_a_sqlite_file_to_a_revision_then_to_head(env, tmp_path):
    url = sqlite(tmp_path / "lab.db")
    out = ok(twarga_lab("upgrade-db", "--db-url", url, "--revision", "0001", env=env))
    assert out == "database is at revision 0001\n"
    out = ok(twarga_lab("upgrade-db", f"--db-url={url}", env=env))
    assert out == f"database is at revision {head_revision()}\n"


def test_create_admin_takes_the_url_and_password_from_the_environment(env, tmp_path):
    db_path = tmp_path / "private" / "twarga.db"
    db_path.parent.mkdir()
    env.update(TWARGA_DB_URL=sqlite(db_path), TWARGA_ADMIN_PASSWORD="correct horse")
    env.update(TWARGA_VMS_DIR=str(tmp_path / "vms"))
    out = ok(twarga_lab("create-admin", env=env))
    assert out == "admin account admin created with $TWARGA_ADMIN_PASSWORD\n"
    assert ok(twarga_lab("create-admin", env=env)) == (
        "admin account admin exists already (password unchanged)\n"
    )
    db = Database(sqlite(db_path)).open()
    try:
        assert AccountService(db).login("admin", "correct horse", "127.0.0.1").ok
    finally:
        db.dispose()


def test_create_admin_prints_a_generated_password_once(env, tmp_path):
    url = sqlite(tmp_path / "lab.db")
    env["TWARGA_ADMIN_USER"] = "boss"
    out = ok(twarga_lab("create-admin", "--db-url", url, "--vms-dir", str(tmp_path), env=env))
    prefix = "admin account boss created; its password (shown once): "
    assert out.startswith(prefix)
    password = out.removeprefix(prefix).strip()
    assert len(password) >= 12
    out = ok(twarga_lab("create-admin", "--name", "other", "--db-url", url, env=env))
    assert out.startswith("admin account other created; its password")
    db = Database(url).open()
    try:
        assert AccountService(db).login("boss", password, "127.0.0.1").ok
    finally:
        db.dispose()


# -- one declaration of each setting ----------------------------------------------------


def test_vms_dir_resolves_as_the_servers_trait_does(env, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("TWARGA_DB_URL", raising=False)
    monkeypatch.delenv("TWARGA_VMS_DIR", raising=False)
    expected = Path(TwargaLabApp(vms_dir="relative/vms").vms_dir)
    assert expected == work / "relative" / "vms"
    ok(twarga_lab("upgrade-db", "--vms-dir", "relative/vms", env=env, cwd=work))
    assert (expected / "twarga.db").is_file()
    # ``~`` is expanded by the trait, not by a shell.
    monkeypatch.setenv("HOME", env["HOME"])
    home_vms = Path(TwargaLabApp(vms_dir="~/labvms").vms_dir)
    assert home_vms == tmp_path / "home" / "labvms"
    ok(twarga_lab("upgrade-db", "--vms-dir=~/labvms", env=env, cwd=work))
    assert (home_vms / "twarga.db").is_file()


def test_settings_come_from_the_environment_then_config_files_then_the_command_line(env, tmp_path):
    env["TWARGA_VMS_DIR"] = str(tmp_path / "env-vms")
    ok(twarga_lab("upgrade-db", env=env))
    assert (tmp_path / "env-vms" / "twarga.db").is_file()
    config = Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_twarga_lab_config.py"
    config.write_text(f"c.TwargaLabApp.vms_dir = {str(tmp_path / 'config-vms')!r}\n")
    ok(twarga_lab("upgrade-db", env=env))
    assert (tmp_path / "config-vms" / "twarga.db").is_file()
    ok(twarga_lab("upgrade-db", "--TwargaLabApp.vms_dir", str(tmp_path / "cli-vms"), env=env))
    assert (tmp_path / "cli-vms" / "twarga.db").is_file()


def test_the_test_driver_probes_as_qemu(env):
    assert ok(twarga_lab("probe", "--libvirt-uri", "test:///default", env=env)) == "qemu\n"


# -- run (in process: it execs jupyter lab) ---------------------------------------------


class Exec(Exception):
    """What the replaced ``os.execv`` raises, with the argv it was given."""


@pytest.fixture
def run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for name in ("TWARGA_DB_URL", "TWARGA_VMS_DIR", "TWARGA_IMAGES_DIR", "TWARGA_LIBVIRT_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TWARGA_TOKEN", "the-token")
    monkeypatch.setenv("JUPYTER_TOKEN", "")  # run sets both; monkeypatch restores them
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "no-config"))

    def execv(path: str, argv: list[str]) -> None:
        raise Exec(path, list(argv))

    monkeypatch.setattr(cli.os, "execv", execv)

    def run_cli(*args: str) -> list[str]:
        with pytest.raises(Exec) as called:
            cli.main(["run", *args])
        path, argv = called.value.args
        assert path == argv[0] and Path(argv[0]).name == "jupyter"
        return argv[1:]

    return run_cli


def test_run_passes_the_resolved_settings_and_the_rest_on_to_jupyter_lab(run, tmp_path, capsys):
    argv = run("--port", "9999", "--vms-dir", "vms2", "--db-url=sqlite:///x.db", "lab.ipynb", "--y")
    root = ["--allow-root"] if os.geteuid() == 0 else []
    assert argv == [
        "lab", "--no-browser", "--ip=127.0.0.1", "--port=9999", "--ServerApp.port_retries=0",
        f"--TwargaLabApp.vms_dir={tmp_path / 'vms2'}",
        f"--TwargaLabApp.images_dir={tmp_path / 'vms2' / 'images'}",
        "--TwargaLabApp.libvirt_uri=qemu:///system", *root, "lab.ipynb", "--y",
    ]  # fmt: skip
    # The database URL (it may hold a password) goes through the environment.
    assert os.environ["TWARGA_DB_URL"] == f"sqlite:///{tmp_path / 'x.db'}"
    assert os.environ["JUPYTER_TOKEN"] == "the-token"
    out = capsys.readouterr().out
    assert out == (
        "Twarga Lab is starting at http://127.0.0.1:9999/lab?token=the-token\n"
        "  API: curl -H 'Authorization: token the-token' http://127.0.0.1:9999/twarga/api/vms\n"
    )


def test_run_passes_other_twarga_settings_and_keeps_none_for_the_next_call(run):
    argv = run("--TwargaLabApp.domain_type=kvm", "--ip", "127.0.0.2", "--", "--x")
    assert "--TwargaLabApp.domain_type=kvm" in argv and "--ip=127.0.0.2" in argv
    assert argv[-2:] == ["--", "--x"]
    again = run()
    assert "--ip=127.0.0.1" in again and "--port=8888" in again
    assert not any(a.startswith("--TwargaLabApp.domain_type") for a in again)
