"""Attacks from users' own accounts on the privileged side of the Hub, done for real:
links planted in a home for the root-run spawn hook, secrets on command lines, direct
calls to loopback ports, and cookie requests from another origin."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tests.conftest import make_placeholder_image
from tests.hub.conftest import HubProcess, api, prepare_hub, start_server, stop_server
from tests.hub.test_hub_journey import approved_user
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


# -- against a real Hub -------------------------------------------------------------------

SCRAPE_TOKEN = "scrape-" + secrets.token_hex(16)
DB_PASSWORD = "pg-" + secrets.token_hex(12)
# Every process's command line, as any account on the host can read them.
DUMP_CMDLINES = """
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            print(pid, f.read().replace(b"\\0", b" ").decode(errors="replace"))
    except OSError:
        pass  # the process ended, or its cmdline is not ours to read
"""
# Read /proc/<pid>/environ of the pids on stdin: "pid denied" or "pid <content>".
READ_ENVIRON = """
import sys
for pid in sys.stdin.read().split():
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            print(pid, f.read().replace(b"\\0", b" ").decode(errors="replace"))
    except PermissionError:
        print(pid, "denied")
"""


@pytest.fixture(scope="module")
def hub_env(postgres_server: str) -> Iterator[dict[str, str]]:
    """The shared Hub environment: Twarga's database on PostgreSQL with a password in its
    URL (the throwaway cluster trusts 127.0.0.1, so any password is accepted), and a
    metrics scrape token for the service."""
    from sqlalchemy import create_engine

    name = f"twarga_hard_{uuid.uuid4().hex[:10]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    server = postgres_server.rsplit("/", 1)[0].replace("postgres@", f"postgres:{DB_PASSWORD}@")
    root = Path("/tmp") / f"twarga-hard-{uuid.uuid4().hex[:8]}"
    images = root.parent / f"{root.name}-images"
    make_placeholder_image(images)
    prefix = f"th{uuid.uuid4().hex[:6]}-"
    env = prepare_hub(root, images, "test:///default", prefix, db_url=f"{server}/{name}")
    env["TWARGA_METRICS_SCRAPE_TOKEN"] = SCRAPE_TOKEN
    yield env
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(images, ignore_errors=True)
    with admin.connect() as conn:
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        conn.exec_driver_sql(f"DROP DATABASE {name}")
    admin.dispose()


def pids_of(word: str) -> list[str]:
    """Pids whose command line holds ``word`` (read as root)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if word.encode() in cmdline:
            found.append(pid)
    return found


def environ_as(user: str, pids: list[str]) -> dict[str, str]:
    result = subprocess.run(
        ["runuser", "-u", user, "--", sys.executable, "-c", READ_ENVIRON],
        input=" ".join(pids), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


def proxy_pid(hub: HubProcess) -> str:
    return (Path(hub.env["TWARGA_STATE_DIR"]) / "jupyterhub-proxy.pid").read_text().strip()


def proxy_token(hub: HubProcess) -> str:
    environ = Path(f"/proc/{proxy_pid(hub)}/environ").read_bytes().split(b"\0")
    token = next(v for v in environ if v.startswith(b"CONFIGPROXY_AUTH_TOKEN="))
    return token.split(b"=", 1)[1].decode()


def proxy_routes(hub: HubProcess) -> dict[str, Any]:
    """The proxy's routing table, read with its token (as root)."""
    reply = httpx.get(
        f"http://127.0.0.1:{hub.env['TWARGA_PROXY_API_PORT']}/api/routes",
        headers={"Authorization": f"token {proxy_token(hub)}"}, timeout=30,
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_no_secret_is_on_a_command_line_or_in_the_hubs_log(hub):
    name, token, _ = approved_user(hub, "se")
    start_server(hub, name, token)
    try:
        db_url = hub.env["TWARGA_DB_URL"]
        assert DB_PASSWORD in db_url
        chp_token = proxy_token(hub)
        dump = as_user(name, sys.executable, "-c", DUMP_CMDLINES)
        assert dump.returncode == 0, dump.stderr
        # The user does see root's processes: the service's and the proxy's command lines.
        assert "twarga_service_config.py" in dump.stdout
        assert "configurable-http-proxy" in dump.stdout
        for secret in (DB_PASSWORD, SCRAPE_TOKEN, chp_token):
            assert secret not in dump.stdout
        log = hub.log.read_text(errors="replace")
        assert "twarga_service_config.py" in log  # the Hub did log the service's command
        assert "database postgresql+psycopg://postgres:***@" in log  # the service's, masked
        for secret in (DB_PASSWORD, SCRAPE_TOKEN, chp_token):
            assert secret not in log

        # The service's and the proxy's environments are root's alone; the user's own
        # server (whose environment the user reads) got none of them.
        service = pids_of("twarga_service_config.py")
        own = pids_of("user_server_config.py")
        assert service and own
        seen = environ_as(name, [*service, proxy_pid(hub), *own])
        assert all(seen[pid] == "denied" for pid in [*service, proxy_pid(hub)]), seen
        mine = " ".join(seen[pid] for pid in own)
        assert f"JUPYTERHUB_USER={name}" in mine  # it is readable, and it is the user's
        for secret in (DB_PASSWORD, SCRAPE_TOKEN, chp_token):
            assert secret not in mine

        # The service got them from its environment: its database and its scrape token.
        created = api(hub, token, "POST", "vms", {"name": "env-1"})
        assert created.status_code == 201, created.text
        from sqlalchemy import create_engine

        engine = create_engine(db_url)
        with engine.connect() as conn:
            names = {row[0] for row in conn.exec_driver_sql("SELECT name FROM vms")}
        engine.dispose()
        assert "env-1" in names
        scrape = httpx.get(
            f"{hub.url}/services/twarga/twarga/metrics",
            headers={"Authorization": f"Bearer {SCRAPE_TOKEN}"}, timeout=60,
        )  # fmt: skip
        assert scrape.status_code == 200, scrape.text
        assert "# TYPE" in scrape.text
    finally:
        stop_server(hub, name, token)


def curl_as(user: str, method: str, url: str, headers: list[str], body: str | None) -> int:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "--max-time", "30"]
    for header in headers:
        argv += ["-H", header]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data", body]
    result = as_user(user, *argv, url)
    return int(result.stdout or 0)


def test_loopback_ports_refuse_users_without_a_valid_token(hub):
    name, token, _ = approved_user(hub, "pt")
    service = f"http://127.0.0.1:{hub.env['TWARGA_SERVICE_PORT']}/services/twarga"
    hub_api = f"http://127.0.0.1:{hub.env['TWARGA_HUB_API_PORT']}/hub/api"
    chp_api = f"http://127.0.0.1:{hub.env['TWARGA_PROXY_API_PORT']}/api"
    calls = [
        ("GET", f"{service}/twarga/api/me", None),
        ("GET", f"{service}/twarga/api/vms?all=1", None),
        ("POST", f"{service}/twarga/api/vms", '{"name": "direct"}'),
        ("GET", f"{service}/twarga/api/admin/users", None),
        ("GET", f"{service}/twarga/metrics", None),
        ("GET", f"{service}/api/contents", None),
        ("POST", f"{service}/api/kernels", "{}"),
        ("GET", f"{hub_api}/users", None),
        ("POST", f"{hub_api}/users/admin/tokens", "{}"),
        ("GET", f"{chp_api}/routes", None),
        ("POST", f"{chp_api}/routes/stolen", '{"target": "http://127.0.0.1:9"}'),
    ]
    for headers in ([], ["Authorization: token not-a-token"], ["Authorization: Bearer nope"]):
        for method, url, body in calls:
            status = curl_as(name, method, url, headers, body)
            assert status in (401, 403), (method, url, headers, status)
    # The user's own Hub token is no key to the proxy's routing table.
    for method, url, body in calls[-2:]:
        status = curl_as(name, method, url, [f"Authorization: token {token}"], body)
        assert status in (401, 403), (method, url, status)
    # The proxy's token is in no place the user can read: not on a command line, not in
    # the environment of the Hub or the proxy (root's processes).
    chp_token = proxy_token(hub)
    dump = as_user(name, sys.executable, "-c", DUMP_CMDLINES)
    assert "configurable-http-proxy" in dump.stdout and chp_token not in dump.stdout
    seen = environ_as(name, [proxy_pid(hub), str(hub.proc.pid)])
    assert set(seen.values()) == {"denied"}, seen
    # And nothing above changed the routes: the real token shows no "stolen" one.
    assert "/stolen" not in proxy_routes(hub)
    assert api(hub, token, "GET", "vms").json() == []  # no VM "direct" either


def test_a_cookie_request_from_another_origin_or_a_users_page_is_refused(hub):
    name, token, client = approved_user(hub, "co")
    me = "/services/twarga/twarga/api/me"
    # Any page of the service sends a logged-in browser through the Hub's OAuth and back
    # with the service's own cookie (files/ itself is refused: the service serves none).
    page = client.http.get("/services/twarga/files/x", follow_redirects=True)
    assert page.status_code == 403
    assert "service-twarga" in {cookie.name for cookie in client.http.cookies.jar}
    first = client.http.get(me)
    assert first.status_code == 200, first.text
    assert first.json()["name"] == name
    port = hub.env["TWARGA_HUB_PORT"]
    assert client.http.get(me, headers={"Origin": hub.url}).status_code == 200
    assert client.http.get(me, headers={"Referer": f"{hub.url}/hub/home"}).status_code == 200
    refused = [
        {"Origin": f"http://mallory.localhost:{port}"},  # another user's subdomain
        {"Origin": "http://evil.example"},
        {"Referer": f"http://mallory.localhost:{port}/user/mallory/files/x.html"},
        # Same origin, but a page served by a user's server:
        {"Origin": hub.url, "Referer": f"{hub.url}/user/mallory/files/x.html"},
        {"Referer": f"{hub.url}/user/{name}/lab"},
    ]
    for headers in refused:
        reply = client.http.get(me, headers=headers)
        assert reply.status_code in (403, 404), (headers, reply.status_code)
        assert name not in reply.text
    # A token is never sent by a browser on its own: with one, the origin does not matter.
    with_token = httpx.get(
        f"{hub.url}{me}",
        headers={"Authorization": f"token {token}", "Origin": "http://evil.example"},
        timeout=60,
    )
    assert with_token.status_code == 200


def test_with_subdomain_host_each_users_server_and_the_service_have_their_own_origin():
    """``TWARGA_SUBDOMAIN_HOST``: the proxy routes ``<name>.<host>`` to a user's server and
    ``twarga--service.<host>`` to the service (names are only Host headers here: nothing
    resolves them; requests go to 127.0.0.1)."""
    root = Path("/tmp") / f"twarga-sub-{uuid.uuid4().hex[:8]}"
    images = root.parent / f"{root.name}-images"
    make_placeholder_image(images)
    env = prepare_hub(root, images, "test:///default", f"ts{uuid.uuid4().hex[:6]}-")
    port = env["TWARGA_HUB_PORT"]
    env["TWARGA_SUBDOMAIN_HOST"] = f"http://hub.localhost:{port}"
    hub = HubProcess(env, root)
    hub.service_host = f"twarga--service.hub.localhost:{port}"
    hub.hub_host = f"hub.localhost:{port}"
    hub.start()
    try:
        name, token, _ = approved_user(hub, "sd")
        auth = {"Authorization": f"token {token}"}
        own_host = f"{name}.hub.localhost:{port}"
        routes = proxy_routes(hub)
        assert "/twarga--service.hub.localhost/services/twarga" in routes, list(routes)
        start_server(hub, name, token)
        try:
            assert f"/{name}.hub.localhost/user/{name}" in proxy_routes(hub)
            # The user's server, on the user's own host, forwards to the service.
            me = httpx.get(
                f"{hub.url}/user/{name}/twarga/api/me",
                headers={**auth, "Host": own_host}, timeout=60,
            )  # fmt: skip
            assert me.status_code == 200, me.text
            assert me.json()["name"] == name
            # The service, on its own host.
            direct = httpx.get(
                f"{hub.url}/services/twarga/twarga/api/me",
                headers={**auth, "Host": hub.service_host}, timeout=60,
            )  # fmt: skip
            assert direct.status_code == 200, direct.text
            # Notebooks are told the service's public address.
            pid = pids_of("user_server_config.py")[0]
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"TWARGA_URL=http://{hub.service_host}/services/twarga/".encode() in environ
        finally:
            stop_server(hub, name, token)
    finally:
        hub.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)


def server_port(name: str) -> int:
    """The loopback port of ``name``'s own server (from its environment, read as root)."""
    for pid in pids_of("user_server_config.py"):
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
            if "=" in item
        )
        if environ.get("JUPYTERHUB_USER") == name:
            return int(environ["JUPYTERHUB_SERVICE_URL"].rsplit(":", 1)[1].split("/")[0])
    raise AssertionError(f"no server of {name} running")


def test_another_users_server_port_refuses_a_direct_call(hub):
    alice, alice_token, _ = approved_user(hub, "al")
    bob, bob_token, _ = approved_user(hub, "bo")
    start_server(hub, alice, alice_token)
    try:
        base = f"http://127.0.0.1:{server_port(alice)}/user/{alice}"
        calls = [
            ("GET", f"{base}/api/contents", None),
            ("POST", f"{base}/api/kernels", "{}"),
            ("GET", f"{base}/twarga/api/me", None),
            ("GET", f"{base}/twarga/api/vms", None),
        ]
        for headers in ([], [f"Authorization: token {bob_token}"]):
            for method, url, body in calls:
                status = curl_as(bob, method, url, headers, body)
                assert status in (401, 403), (method, url, headers, status)
        # The same call with alice's own token does reach her server: the port is right.
        assert curl_as(alice, "GET", f"{base}/twarga/api/me",
                       [f"Authorization: token {alice_token}"], None) == 200  # fmt: skip
    finally:
        stop_server(hub, alice, alice_token)
