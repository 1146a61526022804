"""A real JupyterHub with configurable-http-proxy on loopback, started by the tests from
``hub_config/jupyterhub_config.py`` (the file ``make run`` uses), with the twarga service
on libvirt's test driver and a placeholder image.

- ``hub_env``: environment for one Hub (free ports, private state under a temp folder).
- ``hub``: a started :class:`HubProcess` shared by the module.
- ``HubClient``: a browser-like client (cookies, XSRF) that can come from any 127.x address.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, make_placeholder_image
from tests.helpers import free_port

VENV_BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "Adm1n-" + secrets.token_hex(6)


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout} s")


class HubProcess:
    """``jupyterhub -f hub_config/jupyterhub_config.py`` with a given environment."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{env['TWARGA_HUB_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "hub.log"
        # With TWARGA_SUBDOMAIN_HOST the service answers on its own host name: the
        # Host header to reach it through the proxy (still on 127.0.0.1).
        self.service_host: str | None = None
        self.hub_host: str | None = None  # and the Hub's (HubClient's address then)

    @property
    def db_path(self) -> Path:
        return Path(self.env["TWARGA_DB_URL"].removeprefix("sqlite:///"))

    def start(self) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "jupyterhub"), "-f", str(REPO / "hub_config" / "jupyterhub_config.py")],
            cwd=self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def service_up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            try:
                r = httpx.get(
                    f"{self.url}/services/twarga/twarga/api/me",
                    headers={"Host": self.service_host} if self.service_host else {},
                    timeout=5,
                )
            except httpx.HTTPError:
                return False
            return r.status_code == 401

        try:
            wait_until(service_up, 180, "the Hub and its twarga service starting")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- hub log ---\n{self.tail()}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        pid_file = Path(self.env["TWARGA_STATE_DIR"]) / "jupyterhub-proxy.pid"
        if pid_file.exists():  # a proxy left behind by a killed Hub
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().strip()), 15)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def events(self, **where: str) -> list[dict[str, Any]]:
        """Rows of Twarga's events table (read directly, as root)."""
        import sqlite3

        with sqlite3.connect(self.db_path) as conn:
            conn.row_factory = sqlite3.Row
            rows = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY id")]
        for row in rows:
            row["details"] = json.loads(row["details"] or "{}")
        return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


class LoopbackTransport(httpx.HTTPTransport):
    """Every request goes to 127.0.0.1, whatever host name its URL (and Host header and
    cookies) carries: names like ``hub.localhost`` are never looked up."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = httpx.Request(
            request.method,
            request.url.copy_with(host="127.0.0.1"),
            headers=request.headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return super().handle_request(inner)


class HubClient:
    """A browser-like session with the Hub, from one loopback source address (at
    ``hub.hub_host`` when the Hub has one, still on 127.0.0.1)."""

    def __init__(self, hub: HubProcess, source: str = "127.0.0.1") -> None:
        self.hub = hub
        port = hub.env["TWARGA_HUB_PORT"]
        self.http = httpx.Client(
            base_url=f"http://{hub.hub_host}" if hub.hub_host else hub.url,
            transport=LoopbackTransport(local_address=source),
            follow_redirects=False,
            timeout=60,
        )
        assert hub.hub_host is None or hub.hub_host.endswith(f":{port}")

    def xsrf(self) -> str:
        if "_xsrf" not in self.http.cookies:
            self.http.get("/hub/login")
        return self.http.cookies["_xsrf"]

    def form(self, path: str, data: dict[str, str]) -> httpx.Response:
        return self.http.post(path, data={**data, "_xsrf": self.xsrf()})

    def sign_up(self, name: str, password: str) -> httpx.Response:
        self.http.get("/hub/signup")
        return self.form(
            "/hub/signup", {"username": name, "password": password, "password_confirm": password}
        )

    def login(self, name: str, password: str) -> httpx.Response:
        self.http.get("/hub/login")
        return self.form("/hub/login", {"username": name, "password": password})

    def token(self, name: str) -> str:
        r = self.http.post(
            f"/hub/api/users/{name}/tokens",
            json={"note": "tests", "expires_in": 3600},
            headers={"X-XSRFToken": self.xsrf()},
        )
        assert r.status_code == 201, r.text
        return r.json()["token"]


def api(hub: HubProcess, token: str, method: str, path: str, body: Any = None) -> httpx.Response:
    """Call the twarga service through the Hub's proxy with a token."""
    return httpx.request(
        method,
        f"{hub.url}/services/twarga/twarga/api/{path}",
        headers={"Authorization": f"token {token}"},
        json=body,
        timeout=60,
    )


def prepare_hub(
    root: Path,
    images: Path,
    libvirt_uri: str,
    domain_prefix: str,
    *service_args: str,
    db_url: str | None = None,
) -> dict[str, str]:
    """The environment of a Hub whose state lives under ``root`` (made here), on free
    ports, with its first admin created; ``service_args`` go to the twarga service, and
    Twarga's database is ``db_url`` (a SQLite file under ``root`` by default)."""
    root.mkdir(mode=0o755)
    (root / "private").mkdir(mode=0o700)
    hub_port, api_port, proxy_api_port, service_port = (free_port() for _ in range(4))
    args = [
        f"--TwargaLabApp.domain_prefix={domain_prefix}",
        "--TwargaLabApp.syslog_address=127.0.0.1:0",
        *service_args,
    ]
    env = {
        **os.environ,
        "TWARGA_HUB_PORT": str(hub_port),
        "TWARGA_HUB_API_PORT": str(api_port),
        "TWARGA_PROXY_API_PORT": str(proxy_api_port),
        "TWARGA_SERVICE_PORT": str(service_port),
        "TWARGA_STATE_DIR": str(root / "private"),
        "TWARGA_DB_URL": db_url or f"sqlite:///{root / 'private' / 'twarga.db'}",
        "TWARGA_VMS_DIR": str(root / "vms"),
        "TWARGA_IMAGES_DIR": str(images),
        "TWARGA_LIBVIRT_URI": libvirt_uri,
        "TWARGA_ADMIN_USER": "admin",
        "TWARGA_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "TWARGA_EXTRA_SERVICE_ARGS": " ".join(args),
        "_TWARGA_ROOT": str(root),
    }
    subprocess.run(
        [str(VENV_BIN / "twarga-lab"), "create-admin"],  # the URL from $TWARGA_DB_URL
        env=env,
        check=True,
        capture_output=True,
    )
    return env


@pytest.fixture(scope="module")
def hub_env() -> Iterator[dict[str, str]]:
    # Under /tmp (traversable), not pytest's 0700 folders: users' servers and QEMU read here.
    root = Path("/tmp") / f"twarga-hub-{uuid.uuid4().hex[:8]}"
    images = root.parent / f"{root.name}-images"
    make_placeholder_image(images)
    yield prepare_hub(root, images, "test:///default", f"th{uuid.uuid4().hex[:6]}-")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(images, ignore_errors=True)


@pytest.fixture(scope="module")
def hub(hub_env: dict[str, str]) -> Iterator[HubProcess]:
    process = HubProcess(hub_env, Path(hub_env["_TWARGA_ROOT"]))
    process.start()
    yield process
    process.stop()
    # Keep the Hub's log as a test artifact (the folder itself is removed).
    artifacts = REPO / "test-artifacts" / "hub"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(process.log, artifacts / f"{Path(hub_env['_TWARGA_ROOT']).name}.log")


def start_server(hub: HubProcess, name: str, token: str) -> None:
    """Start ``name``'s JupyterLab through the Hub's API and wait until it is ready."""
    auth = {"Authorization": f"token {token}"}
    started = httpx.post(f"{hub.url}/hub/api/users/{name}/server", headers=auth, timeout=60)
    assert started.status_code in (201, 202), started.text

    def ready() -> bool:
        model = httpx.get(f"{hub.url}/hub/api/users/{name}", headers=auth, timeout=10).json()
        return bool(model.get("servers", {}).get("", {}).get("ready"))

    wait_until(ready, 120, f"{name}'s server starting")


def stop_server(hub: HubProcess, name: str, token: str) -> None:
    """Stop ``name``'s server (nothing happens if it is not running)."""
    auth = {"Authorization": f"token {token}"}
    httpx.delete(f"{hub.url}/hub/api/users/{name}/server", headers=auth, timeout=60)


def unique_name(prefix: str) -> str:
    """A fresh Hub (and system) user name: system accounts outlive a test run."""
    return f"{prefix}{uuid.uuid4().hex[:6]}"
