"""Fixtures for tests that need a separately running Twarga service on qemu:///system.

- ``running_server(ssh_port_min, *args)``: a ``jupyter server`` subprocess with the
  extension (personal mode), the fake Hub identity (tokens alice-token, bob-token,
  admin-token), real images, and VM storage libvirt's QEMU user can reach; its domains
  are removed afterwards.
- ``live_server``: one of those, shared by a test module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.helpers import destroy_domains, free_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class LiveServer:
    url: str
    prefix: str
    work: Path
    log: Path


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_until_serving(
    proc: subprocess.Popen[bytes], url: str, token: str, log: Path, timeout: float = 90
) -> None:
    """Poll ``/twarga/api/me`` with ``token`` until the server answers 200 (or fail with
    the tail of its log when it dies or the deadline passes)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            me = httpx.get(url + "twarga/api/me", headers={"Authorization": f"token {token}"})
            if me.status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet: poll again until the deadline
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


@contextmanager
def running_server(ssh_port_min: int, *extra_args: str) -> Iterator[LiveServer]:
    """A personal-mode ``jupyter server`` subprocess with Twarga Lab on qemu:///system and
    the fake Hub identity; its domains are removed and its log kept afterwards."""
    images = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
    if not (images / "twarga" / "tiny" / "image.json").exists():
        pytest.fail(f"no twarga/tiny under {images}: run `make image` (make test does)")
    # libvirt's QEMU user must reach the disks: not under pytest's 0700 temporary folders.
    work = REPO / "vms" / "test-runs" / f"live-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    for folder in (work, work.parent):
        folder.chmod(0o755)
    prefix = f"twl{secrets.token_hex(3)}-"
    port = free_port()
    log = work / "server.log"
    argv = [
        str(VENV_BIN / "jupyter"),
        "server",
        "--no-browser",
        "--allow-root",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--ServerApp.root_dir={work}",
        "--ServerApp.identity_provider_class=tests.identity.FakeHubIdentityProvider",
        "--TwargaLabApp.libvirt_uri=qemu:///system",
        f"--TwargaLabApp.vms_dir={work / 'vms'}",
        f"--TwargaLabApp.images_dir={images}",
        f"--TwargaLabApp.domain_prefix={prefix}",
        f"--TwargaLabApp.ssh_port_min={ssh_port_min}",
        f"--TwargaLabApp.ssh_port_max={ssh_port_min + 99}",
        "--TwargaLabApp.stop_timeout=20",
        "--TwargaLabApp.syslog_address=127.0.0.1:0",
        *extra_args,
    ]
    # A setting in extra_args replaces the default above (traitlets refuses two values):
    # a test that restarts a service passes the same vms_dir, db_url and domain_prefix.
    overridden = {a.split("=", 1)[0] for a in extra_args if a.startswith("--") and "=" in a}
    argv = [a for a in argv if a in extra_args or a.split("=", 1)[0] not in overridden]
    # Its own runtime folder: kernels it starts find it, not other servers on this machine.
    env = {**os.environ, "PYTHONPATH": str(REPO), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(proc, url, "alice-token", log)
        yield LiveServer(url, prefix, work, log)
    finally:
        stop_process(proc)
        destroy_domains(prefix)
        artifacts = REPO / "test-artifacts" / "live-servers"
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, artifacts / f"{work.name}.log")
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    with running_server(23500) as server:
        yield server
