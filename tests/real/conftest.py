"""Fixtures for tests that need a separately running Twarga service on qemu:///system.

- ``live_server``: a ``jupyter server`` subprocess with the extension (personal mode), the
  fake Hub identity (tokens alice-token, bob-token, admin-token), real images, and VM
  storage libvirt's QEMU user can reach. Module-scoped; domains are cleaned up after.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.helpers import destroy_domains

VENV_BIN = Path(sys.executable).parent


@dataclass
class LiveServer:
    url: str
    prefix: str
    vms_dir: Path
    log: Path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server() -> Iterator[LiveServer]:
    images = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
    if not (images / "twarga" / "tiny" / "image.json").exists():
        pytest.fail(f"no twarga/tiny under {images}: run `make image` (make test does)")
    work = REPO / "vms" / "test-runs" / f"live-{secrets.token_hex(4)}"
    work.mkdir(parents=True)
    for folder in (work, work.parent):
        folder.chmod(0o755)
    prefix = f"twl{secrets.token_hex(3)}-"
    port = _free_port()
    log = work / "server.log"
    argv = [
        str(VENV_BIN / "jupyter"), "server", "--no-browser", "--allow-root", "--ip=127.0.0.1",
        f"--port={port}", f"--ServerApp.root_dir={work}",
        "--ServerApp.identity_provider_class=tests.identity.FakeHubIdentityProvider",
        "--TwargaLabApp.libvirt_uri=qemu:///system", f"--TwargaLabApp.vms_dir={work / 'vms'}",
        f"--TwargaLabApp.images_dir={images}", f"--TwargaLabApp.domain_prefix={prefix}",
        "--TwargaLabApp.ssh_port_min=23500", "--TwargaLabApp.ssh_port_max=23599",
        "--TwargaLabApp.stop_timeout=20", "--TwargaLabApp.syslog_address=127.0.0.1:0",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            reply = httpx.get(url + "twarga/api/me", headers={"Authorization": "token alice-token"})
            if reply.status_code == 200:
                break
        except httpx.HTTPError:
            pass  # not listening yet: poll again until the deadline
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    yield LiveServer(url, prefix, work / "vms", log)
    proc.terminate()
    proc.wait(timeout=30)
    destroy_domains(prefix)
    artifacts = REPO / "test-artifacts" / "live-servers"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(log, artifacts / f"{work.name}.log")
    shutil.rmtree(work, ignore_errors=True)
