"""Fixtures for Twarga Lab's tests.

- ``fake_image_dir``: an images folder holding ``twarga/tiny`` made of placeholder files,
  enough for libvirt's ``test:///default`` driver (which boots nothing).
- ``jp_server_config``: the in-process Jupyter server with the extension on
  ``test:///default``, a fresh SQLite database and the fake Hub identity
  (``tests/identity.py``: tokens for alice, bob and an admin).
- ``twarga``: the started extension (reconciled), stopped after the test.
- ``api``: ``await api("GET", "vms", user="alice", body=...)`` -> ``Reply(status, json,
  headers)``; never raises on HTTP errors so tests assert on status and body.
- ``real_image_dir``, ``real_vms_dir``, ``real_settings(ssh_port_min, **extra)``: the
  repository's built images, VM storage QEMU can reach, and settings for ``qemu:///system``
  in tests marked ``real`` (they need ``make test``'s libvirtd and ``twarga-lab image build``).
- ``cleanup_domains``: removes the test's libvirt domains afterwards.
- ``postgres_url``: a fresh PostgreSQL database per test, on a throwaway cluster the
  session starts with Debian's PostgreSQL 15 (or on ``$TWARGA_TEST_POSTGRES_URL``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from traitlets.config import Config

from tests.helpers import destroy_domains
from tests.identity import FakeHubIdentityProvider, auth

pytest_plugins = ["pytest_jupyter.jupyter_server"]

REPO = Path(__file__).resolve().parent.parent


def make_placeholder_image(images_dir: Path, name: str = "twarga/tiny") -> Path:
    """An image whose kernel and initrd are empty files and whose base is a real qcow2."""
    folder = images_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vmlinuz").write_bytes(b"")
    (folder / "initrd.img").write_bytes(b"")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "base.qcow2"), "1G"], check=True
    )
    (folder / "image.json").write_text(
        json.dumps(
            {
                "name": name,
                "kind": "kernel",
                "os_type": "linux",
                "description": "placeholder for the test driver",
                "base_disk": "base.qcow2",
                "kernel": "vmlinuz",
                "initrd": "initrd.img",
                "kernel_version": "test",
            }
        )
    )
    return folder


@dataclass
class Reply:
    status: int
    json: Any
    headers: Any


@pytest.fixture
def fake_image_dir(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    make_placeholder_image(images)
    return images


@pytest.fixture
def twarga_config() -> dict[str, Any]:
    """Extra TwargaLabApp settings for one test (override the fixture to change them)."""
    return {}


@pytest.fixture
def jp_server_config(tmp_path: Path, fake_image_dir: Path, twarga_config: dict[str, Any]) -> Config:
    settings = {
        "libvirt_uri": "test:///default",
        "vms_dir": str(tmp_path / "vms"),
        "db_url": f"sqlite:///{tmp_path / 'twarga.db'}",
        "images_dir": str(fake_image_dir),
        # test:///default is shared by the whole process: a prefix per test keeps them apart.
        "domain_prefix": f"tt{uuid.uuid4().hex[:8]}-",
        "stop_timeout": 2.0,
        # A free port per server: tests never fight over (or need) 127.0.0.1:5514.
        "syslog_address": "127.0.0.1:0",
    }
    settings.update(twarga_config)
    return Config(
        {
            "ServerApp": {
                "jpserver_extensions": {"twarga_lab": True},
                "identity_provider_class": FakeHubIdentityProvider,
            },
            "TwargaLabApp": settings,
        }
    )


@pytest.fixture
def twarga(jp_serverapp: Any, jp_asyncio_loop: Any) -> Any:
    """The started Twarga extension app (services reconciled with libvirt)."""
    ext = jp_serverapp.extension_manager.extension_points["twarga_lab"].app
    jp_asyncio_loop.run_until_complete(ext._start_jupyter_server_extension(jp_serverapp))
    yield ext
    jp_asyncio_loop.run_until_complete(ext.stop_extension())


@pytest.fixture
def api(jp_fetch: Any, twarga: Any) -> Any:
    """Call the Twarga API as one of the fake Hub users."""

    async def call(
        method: str,
        path: str,
        *,
        user: str | None = "alice",
        body: Any = None,
        raw: str | None = None,
        params: dict[str, str] | None = None,
    ) -> Reply:
        headers = auth(f"{user}-token") if user else {"Authorization": ""}
        payload = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if payload is None and method in ("POST", "PATCH", "PUT"):
            payload = ""
        parts = path.strip("/").split("/")
        if not path.startswith("/"):
            parts = ["twarga", "api", *parts]  # relative to /twarga/api unless absolute
        response = await jp_fetch(
            *parts,
            method=method,
            body=payload,
            headers=headers,
            params=params,
            raise_error=False,
            allow_nonstandard_methods=True,
        )
        text = response.body.decode() if response.body else ""
        return Reply(response.code, json.loads(text) if text else None, response.headers)

    return call


@pytest.fixture
def real_vms_dir() -> Path:
    """A VM folder libvirt's QEMU user can reach (pytest's tmp dirs are 0700)."""
    folder = REPO / "vms" / "test-runs" / uuid.uuid4().hex[:8]
    folder.mkdir(parents=True)
    for parent in (folder, folder.parent):
        parent.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def real_settings(real_image_dir: Path, real_vms_dir: Path) -> Any:
    """``real_settings(23100, **extra)``: TwargaLabApp settings for real guests on
    qemu:///system, with a unique domain prefix and 100 SSH ports from the given one."""

    def make(ssh_port_min: int, **extra: Any) -> dict[str, Any]:
        return {
            "libvirt_uri": "qemu:///system",
            "vms_dir": str(real_vms_dir),
            "images_dir": str(real_image_dir),
            "domain_type": "auto",
            "domain_prefix": f"twt{uuid.uuid4().hex[:6]}-",
            "stop_timeout": 30.0,
            "ssh_port_min": ssh_port_min,
            "ssh_port_max": ssh_port_min + 99,
            **extra,
        }

    return make


@pytest.fixture
def cleanup_domains(twarga: Any) -> Any:
    """Removes the test's libvirt domains afterwards, whatever the test left."""
    yield
    destroy_domains(twarga.domain_prefix)


@pytest.fixture
def real_image_dir() -> Path:
    """The repository's built images (``twarga-lab image build``), for real guests."""
    images = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
    if not (images / "twarga" / "tiny" / "image.json").exists():
        pytest.fail(f"no twarga/tiny under {images}: run `make image` (make test does)")
    return images


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """An admin URL of a PostgreSQL server: ``$TWARGA_TEST_POSTGRES_URL``, or a throwaway
    cluster on 127.0.0.1 run by the ``postgres`` account for this session."""
    url = os.environ.get("TWARGA_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not (PG_BIN / "initdb").exists():
        pytest.fail("PostgreSQL 15 is not installed: `make test` installs Debian's postgresql")
    import socket

    data = Path("/tmp") / f"twarga-pg-{uuid.uuid4().hex[:8]}"
    data.mkdir(mode=0o700)
    shutil.chown(data, "postgres", "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres", "--no-sync"], check=True, capture_output=True)  # fmt: skip
    subprocess.run(
        [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"),
         "-o", f"-h 127.0.0.1 -p {port} -k {data} -F", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast",
                    "stop"], capture_output=True)  # fmt: skip
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: str) -> Any:
    """A new, empty database on the PostgreSQL server, dropped after the test."""
    from sqlalchemy import create_engine

    name = f"twarga_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield f"{postgres_server.rsplit('/', 1)[0]}/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.exec_driver_sql(f"DROP DATABASE {name}")
    admin.dispose()
