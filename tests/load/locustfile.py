"""One Twarga Lab user under load, for locust: ``tests/hub/test_load.py`` and
``bench/load.py`` both run this file (``locust -f tests/load/locustfile.py --headless``).

Each simulated user logs in through the Hub for real (the login form with its XSRF
cookie, then a Hub API token made with that session, as a notebook or script does), then
loops: list its VMs, create one, destroy it, read the host's metrics, read its SOC
events. The API requests go to ``--host``: the Hub's proxy
(``http://127.0.0.1:<hub port>/services/twarga/twarga/api``) or, for the bench's
comparison, the service's own port with the same kind of Hub-issued token.

Settings come from the environment (locust runs in its own process):

- ``LOAD_HUB_URL``   the Hub's public URL, where the login form is
- ``LOAD_ACCOUNTS``  a JSON file ``[{"name": ..., "password": ...}, ...]``: one Hub
                     account per simulated user (a user's quota of 5 VMs is its own)
- ``LOAD_SUMMARY``   where to write the run's summary (JSON, see ``write_summary``)
- ``LOAD_WAIT``      a user's pause between two requests in seconds, ``min,max``
                     [``0.2,0.6``]: people click, they do not loop flat out

Exact response times are kept here (locust's own percentiles are rounded to two
significant digits), with every status code, so the caller can count 5xx answers and
database-lock errors itself instead of parsing locust's failure strings.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, between, events, task
from locust.exception import StopUser

HUB_URL = os.environ.get("LOAD_HUB_URL", "").rstrip("/")
_wait_min, _wait_max = (float(x) for x in os.environ.get("LOAD_WAIT", "0.2,0.6").split(","))

# Requests by name: response times (ms), status codes, and the first bodies of 5xx
# answers and of any answer that mentions a lock (what a SQLite writer jam looks like).
TIMES: dict[str, list[float]] = defaultdict(list)
STATUSES: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
PROBLEMS: list[dict[str, Any]] = []
LOCK_ERRORS: list[dict[str, Any]] = []
CLOCK: dict[str, float] = {}
_accounts: list[dict[str, str]] = []
_next_account = itertools.count()  # gevent runs users on one thread: no lock needed


def _load_accounts() -> list[dict[str, str]]:
    if not _accounts:
        path = os.environ.get("LOAD_ACCOUNTS")
        if not path:
            raise RuntimeError("LOAD_ACCOUNTS (a JSON file of Hub accounts) is not set")
        _accounts.extend(json.loads(Path(path).read_text()))
    return _accounts


@events.test_start.add_listener
def _started(**_: Any) -> None:
    CLOCK["start"] = time.monotonic()


@events.test_stop.add_listener
def _stopped(**_: Any) -> None:
    CLOCK["stop"] = time.monotonic()


@events.request.add_listener
def _record(
    request_type: str,
    name: str,
    response_time: float,
    response: Any = None,
    exception: BaseException | None = None,
    **_: Any,
) -> None:
    TIMES[name].append(response_time)
    status = getattr(response, "status_code", None) or 0  # 0: no answer at all
    STATUSES[name][str(status)] += 1
    body = ""
    if response is not None and (status >= 500 or status == 0 or exception is not None):
        body = (getattr(response, "text", None) or "")[:500]
    if (status >= 500 or status == 0) and len(PROBLEMS) < 50:  # enough to diagnose
        PROBLEMS.append({"name": name, "status": status, "body": body, "error": repr(exception)})
    if "locked" in body.lower() or "locked" in repr(exception).lower():
        LOCK_ERRORS.append({"name": name, "status": status, "body": body})


@events.quitting.add_listener
def write_summary(**_: Any) -> None:
    """``{"duration": s, "requests": {name: {"times_ms": [...], "statuses": {code: n}}},
    "problems": [...], "lock_errors": [...]}``, to ``$LOAD_SUMMARY``."""
    path = os.environ.get("LOAD_SUMMARY")
    if not path:
        return
    start = CLOCK.get("start", 0.0)
    summary = {
        "duration": CLOCK.get("stop", time.monotonic()) - start,
        "requests": {
            name: {"times_ms": TIMES[name], "statuses": dict(STATUSES[name])} for name in TIMES
        },
        "problems": PROBLEMS,
        "lock_errors": LOCK_ERRORS,
    }
    Path(path).write_text(json.dumps(summary))


class LabUser(FastHttpUser):
    """A person with a Twarga account: logs in once, then works with VMs and dashboards."""

    wait_time = between(_wait_min, _wait_max)
    # A saturated service answers in seconds, not locust's default limit: fail on a hang.
    network_timeout = 60.0
    connection_timeout = 60.0

    def on_start(self) -> None:
        accounts = _load_accounts()
        index = next(_next_account)
        if index >= len(accounts):  # a user without an account would measure nothing
            raise RuntimeError(f"{index + 1} users but only {len(accounts)} accounts")
        self.account = accounts[index]
        self.token = self.log_in()
        self.auth = {"Authorization": f"token {self.token}"}
        self.vm_count = 0
        # Names unique across runs: a user killed mid-round (past --stop-timeout) leaves
        # its VM behind, and the bench's second run uses the same accounts.
        self.vm_prefix = f"load-{secrets.token_hex(3)}"

    def log_in(self) -> str:
        """The Hub's login form, then a token from the Hub's API with that session."""
        name, password = self.account["name"], self.account["password"]
        with self.client.get(
            f"{HUB_URL}/hub/login", name="GET /hub/login", catch_response=True
        ) as page:
            xsrf = self._cookie("_xsrf")
            if page.status_code != 200 or not xsrf:
                page.failure(f"no login form: {page.status_code}")
                self.give_up()
        with self.client.post(
            f"{HUB_URL}/hub/login",
            data={"username": name, "password": password, "_xsrf": xsrf},
            name="POST /hub/login",
            allow_redirects=False,
            catch_response=True,
        ) as login:
            if login.status_code != 302:  # the Hub redirects a successful login
                login.failure(f"login refused: {login.status_code}")
                self.give_up()
            login.success()
        # The Hub issues a new XSRF token bound to the logged-in session.
        xsrf = self._cookie("_xsrf") or xsrf
        with self.client.post(
            f"{HUB_URL}/hub/api/users/{name}/tokens",
            json={"note": "load test", "expires_in": 3600},
            headers={"X-XSRFToken": xsrf},
            name="POST /hub/api/users/[name]/tokens",
            catch_response=True,
        ) as made:
            if made.status_code != 201:
                made.failure(f"no token: {made.status_code} {made.text[:200]}")
                self.give_up()
            return str(made.json()["token"])

    def give_up(self) -> None:
        """A user who cannot log in ends the whole run: the next 60 s would measure
        nothing, and the failure is already recorded for the caller."""
        gevent.spawn(self.environment.runner.quit)  # not from this greenlet: it is killed
        raise StopUser()

    def _cookie(self, name: str) -> str | None:
        # The last one set wins, as in a browser (the Hub replaces _xsrf at login).
        values = [c.value for c in self.client.cookiejar if c.name == name]
        return values[-1] if values else None

    def think(self) -> None:
        """A pause inside a round. Not ``self.wait()``: locust stops a user at its waits,
        and a user stopped between create and destroy would leave its VM behind; with
        plain sleeps a round runs to its end within ``--stop-timeout``."""
        gevent.sleep(random.uniform(_wait_min, _wait_max))

    @task
    def work(self) -> None:
        """One round of what the Dashboard does: list, create, destroy, then the Monitor's
        host metrics and the SOC's events, each a request of its own name."""
        self.client.get("/vms", headers=self.auth, name="GET /vms")
        self.think()
        self.vm_count += 1
        with self.client.post(
            "/vms",
            json={"name": f"{self.vm_prefix}-{self.vm_count}"},
            headers=self.auth,
            name="POST /vms",
            catch_response=True,
        ) as created:
            vm_id = created.json().get("id") if created.status_code == 201 else None
            if vm_id is None:
                created.failure(f"create answered {created.status_code}: {created.text[:200]}")
        self.think()
        if vm_id is not None:
            self.client.delete(f"/vms/{vm_id}", headers=self.auth, name="DELETE /vms/[id]")
            self.think()
        self.client.get("/metrics/host", headers=self.auth, name="GET /metrics/host")
        self.think()
        self.client.get("/soc/events?limit=50", headers=self.auth, name="GET /soc/events")
