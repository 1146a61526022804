"""Attacks from users' own accounts on the privileged side of the Hub, done for real:
links planted in a home for the root-run spawn hook, secrets on command lines, direct
calls to loopback ports, and cookie requests from another origin."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from twarga_lab.hub.spawn import prepare_user_home
from twarga_lab.notebooks import FOLDER, notebook_templates

pytestmark = pytest.mark.hub


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", user, "--", *argv], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def account() -> Iterator[str]:
    """A throwaway system account with a home, removed afterwards."""
    name = f"tw{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True)
    yield name
    subprocess.run(["userdel", "-r", "-f", name], capture_output=True)


def run_hook(name: str) -> None:
    spawner = SimpleNamespace(user=SimpleNamespace(name=name), log=logging.getLogger("test"))
    asyncio.run(prepare_user_home(spawner))


def snapshot(path: Path) -> dict[str, tuple[int, int, int, bytes | None]]:
    """Owner, group, mode and content of a path and everything under it (links unfollowed)."""
    found = {}
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        st = item.lstat()
        content = item.read_bytes() if stat.S_ISREG(st.st_mode) else None
        found[str(item)] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), content)
    return found


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A root-owned folder (like /etc) holding a root-owned file named like a notebook."""
    folder = Path(tempfile.mkdtemp(prefix="twarga-rootdir-"))
    folder.chmod(0o755)
    (folder / notebook_templates()[0].name).write_text("root's file\n")
    (folder / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_notebooks_are_installed_as_the_users_own_files(account):
    run_hook(account)
    home = Path(os.path.expanduser(f"~{account}"))
    entry = home.stat()
    folder = home / FOLDER
    names = {p.name for p in notebook_templates()}
    assert {p.name for p in folder.iterdir()} == names
    for path in [folder, *folder.iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (entry.st_uid, entry.st_gid), path
    # The user's edits survive the next start.
    edited = folder / notebook_templates()[0].name
    assert as_user(account, "sh", "-c", f"echo mine > {edited}").returncode == 0
    run_hook(account)
    assert edited.read_text() == "mine\n"


def test_a_link_to_a_root_folder_is_not_followed(account, root_dir):
    home = Path(os.path.expanduser(f"~{account}"))
    before = snapshot(root_dir)
    assert as_user(account, "ln", "-s", str(root_dir), str(home / FOLDER)).returncode == 0
    run_hook(account)
    assert snapshot(root_dir) == before  # no chown, no new file, no content changed
    assert (home / FOLDER).is_symlink()


def test_a_link_to_a_root_file_is_not_followed(account, root_dir):
    home = Path(os.path.expanduser(f"~{account}"))
    target = root_dir / "passwd"
    before = snapshot(root_dir)
    assert as_user(account, "ln", "-s", str(target), str(home / FOLDER)).returncode == 0
    run_hook(account)
    assert snapshot(root_dir) == before


def test_links_to_root_files_inside_the_folder_are_not_followed(account, root_dir):
    """The folder is the user's, but each notebook in it is a link to a root file."""
    home = Path(os.path.expanduser(f"~{account}"))
    before = snapshot(root_dir)
    assert as_user(account, "mkdir", str(home / FOLDER)).returncode == 0
    for template in notebook_templates():
        link = home / FOLDER / template.name
        assert as_user(account, "ln", "-s", str(root_dir / "passwd"), str(link)).returncode == 0
    run_hook(account)
    assert snapshot(root_dir) == before
