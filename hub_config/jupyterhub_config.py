"""JupyterHub for Twarga Lab: the front door (sign-up, login, admin), the ``twarga``
service (the only process with libvirt and database access) and users' JupyterLab
servers, each running as its own system account.

Everything is steered by environment variables so ``make run`` and the test suite use
this same file (defaults in brackets):

- TWARGA_HUB_IP / TWARGA_HUB_PORT    public address [127.0.0.1 / 8000]
- TWARGA_HUB_API_PORT                 the Hub's internal API port [8081]
- TWARGA_PROXY_API_PORT               configurable-http-proxy's API port [Hub API port + 1]
- TWARGA_SERVICE_PORT                 the twarga service's port [10101]
- TWARGA_STATE_DIR                    private state: Hub DB, cookie secret, Twarga DB
                                      [<repo>/vms/private], made mode 0700
- TWARGA_DB_URL                       Twarga's database [sqlite:///<state>/twarga.db]
- TWARGA_VMS_DIR / TWARGA_IMAGES_DIR  VM storage [<repo>/vms, <repo>/vms/images]
- TWARGA_LIBVIRT_URI                  [qemu:///system]
- TWARGA_HOSTS                        several hypervisor hosts, "name=uri name=uri"
                                      (TwargaLabApp.hosts) [one: local=TWARGA_LIBVIRT_URI]
- TWARGA_ADMIN_USER                   the first admin [admin]
- TWARGA_SUBDOMAIN_HOST               e.g. http://lab.example.org:8000: each user's server
                                      on its own origin (<name>.lab.example.org), the
                                      service on twarga--service.lab.example.org [off]
- TWARGA_METRICS_SCRAPE_TOKEN         the Prometheus scrape token of the service [none]
- TWARGA_EXTRA_SERVICE_ARGS           more arguments for the service (space separated;
                                      they are on its command line: no secrets here)
"""

import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

from jupyterhub.utils import subdomain_hook_idna

from twarga_lab.hub.spawn import prepare_user_home

c = get_config()  # type: ignore[name-defined]  # noqa: F821

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
STATE = Path(os.environ.get("TWARGA_STATE_DIR", REPO / "vms" / "private"))
STATE.mkdir(parents=True, exist_ok=True)
STATE.chmod(0o700)  # users' accounts must not read the databases or the cookie secret

HUB_IP = os.environ.get("TWARGA_HUB_IP", "127.0.0.1")
HUB_PORT = int(os.environ.get("TWARGA_HUB_PORT", "8000"))
HUB_API_PORT = int(os.environ.get("TWARGA_HUB_API_PORT", "8081"))
PROXY_API_PORT = int(os.environ.get("TWARGA_PROXY_API_PORT", str(HUB_API_PORT + 1)))
SERVICE_PORT = int(os.environ.get("TWARGA_SERVICE_PORT", "10101"))
DB_URL = os.environ.get("TWARGA_DB_URL", f"sqlite:///{STATE / 'twarga.db'}")
VMS_DIR = os.environ.get("TWARGA_VMS_DIR", str(REPO / "vms"))
IMAGES_DIR = os.environ.get("TWARGA_IMAGES_DIR", str(Path(VMS_DIR) / "images"))
LIBVIRT_URI = os.environ.get("TWARGA_LIBVIRT_URI", "qemu:///system")
ADMIN = os.environ.get("TWARGA_ADMIN_USER", "admin")
PUBLIC_URL = f"http://{HUB_IP}:{HUB_PORT}"
SUBDOMAIN_HOST = os.environ.get("TWARGA_SUBDOMAIN_HOST", "").rstrip("/")
if SUBDOMAIN_HOST:
    _host = urlsplit(SUBDOMAIN_HOST)
    _service_host = subdomain_hook_idna("twarga", _host.hostname, "service")
    _port = f":{_host.port}" if _host.port else ""
    SERVICE_PUBLIC_URL = f"{_host.scheme}://{_service_host}{_port}/services/twarga/"
else:
    SERVICE_PUBLIC_URL = f"{PUBLIC_URL}/services/twarga/"

# -- the Hub and its proxy --------------------------------------------------------------
c.JupyterHub.bind_url = f"{PUBLIC_URL}/"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{HUB_API_PORT}"
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.command = [str(REPO / "node_modules" / ".bin" / "configurable-http-proxy")]
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{PROXY_API_PORT}"
c.JupyterHub.template_paths = [str(REPO / "twarga_lab" / "hub" / "templates")]
c.JupyterHub.cleanup_servers = True
# On one origin, a page from any user's server can script every other page of the Hub
# (JupyterHub's documented limit); subdomains give each user's server its own origin.
if SUBDOMAIN_HOST:
    c.JupyterHub.subdomain_host = SUBDOMAIN_HOST

# -- who may log in ---------------------------------------------------------------------
c.JupyterHub.authenticator_class = "twarga_lab.hub.authenticator.TwargaAuthenticator"
c.TwargaAuthenticator.db_url = DB_URL
c.Authenticator.admin_users = {ADMIN}
c.Authenticator.allow_all = True  # anyone the authenticator accepts (approved accounts)

# -- the twarga service -----------------------------------------------------------------
# Settings travel in the service's environment, never in its argv: every account can read
# /proc/<pid>/cmdline and the Hub logs the command, while /proc/<pid>/environ of a root
# process is root's alone. The database URL may hold a PostgreSQL password.
service_environment = {
    "TWARGA_MODE": "service",
    "PATH": os.environ.get("PATH", ""),
    "TWARGA_DB_URL": DB_URL,
    "TWARGA_VMS_DIR": VMS_DIR,
    "TWARGA_IMAGES_DIR": IMAGES_DIR,
    "TWARGA_LIBVIRT_URI": LIBVIRT_URI,
}
if os.environ.get("TWARGA_HOSTS"):
    service_environment["TWARGA_HOSTS"] = os.environ["TWARGA_HOSTS"]
if os.environ.get("TWARGA_METRICS_SCRAPE_TOKEN"):
    service_environment["TWARGA_METRICS_SCRAPE_TOKEN"] = os.environ["TWARGA_METRICS_SCRAPE_TOKEN"]
service_command = [
    str(VENV_BIN / "jupyterhub-singleuser"),
    f"--config={REPO / 'hub_config' / 'twarga_service_config.py'}",
    f"--ServerApp.root_dir={STATE}",
    *shlex.split(os.environ.get("TWARGA_EXTRA_SERVICE_ARGS", "")),
]
c.JupyterHub.services = [
    {
        "name": "twarga",
        "url": f"http://127.0.0.1:{SERVICE_PORT}",
        "command": service_command,
        "oauth_no_confirm": True,
        "display": True,
        "info": {"description": "Twarga Lab: your virtual machines"},
        "environment": service_environment,
    }
]
c.JupyterHub.load_roles = [
    # Everyone may use the twarga service (its API checks ownership per VM).
    {"name": "user", "scopes": ["self", "access:services!service=twarga"]},
    # The service reads users' admin flag, and groups (a class's members, its instructors).
    {
        "name": "twarga-service",
        "scopes": ["read:users", "list:users", "read:groups", "list:groups"],
        "services": ["twarga"],
    },
    # Instructors (members of the "instructors" group) see the classes' groups and users; the
    # twarga service lets them deploy labs to, see and grade the groups they belong to.
    {
        "name": "instructor",
        "description": "Deploy Twarga labs to a class (a Hub group) and grade them",
        "scopes": ["read:groups", "list:groups", "read:users:name", "list:users"],
        "groups": ["instructors"],
    },
]
c.JupyterHub.load_groups = {"instructors": {}}

# -- users' servers -----------------------------------------------------------------------
c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"
c.Spawner.cmd = [str(VENV_BIN / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.args = [f"--config={REPO / 'hub_config' / 'user_server_config.py'}"]
c.Spawner.notebook_dir = "~"
c.Spawner.http_timeout = 60
c.Spawner.start_timeout = 90
# The server's own token may call the twarga service: notebooks and the lab panel use it.
c.Spawner.server_token_scopes = [
    "access:servers!server",
    "users:activity!user",
    "access:services!service=twarga",
]
# The Dashboard, Monitor, SOC, Admin and Python-API notebooks are there on first login.
c.Spawner.pre_spawn_hook = prepare_user_home
c.Spawner.environment = {
    "TWARGA_MODE": "proxy",
    "TWARGA_URL": SERVICE_PUBLIC_URL,
    "TWARGA_SERVICE_URL": f"http://127.0.0.1:{SERVICE_PORT}/services/twarga/",
}
