"""Load on a real Hub: accounts for the simulated users, one headless locust run of
``locustfile.py``, and its figures. Used by ``tests/hub/test_load.py`` and
``bench/load.py``.

Locust runs as a subprocess: its gevent monkey-patching must not reach pytest (or the
bench's own HTTP clients), and it gets a core of its own from the scheduler.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.hub.conftest import ADMIN_PASSWORD, HubClient, HubProcess, unique_name

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUST = Path(sys.executable).parent / "locust"
PASSWORD = "Correct-Horse-7-Battery"
# What the simulated users send after logging in, in the order the figures are printed.
API_REQUESTS = ["GET /vms", "POST /vms", "DELETE /vms/[id]", "GET /metrics/host", "GET /soc/events"]
LOGIN_REQUESTS = ["GET /hub/login", "POST /hub/login", "POST /hub/api/users/[name]/tokens"]


def make_accounts(hub: HubProcess, count: int) -> list[dict[str, str]]:
    """``count`` Hub accounts, signed up and approved by the admin, never logged in (the
    simulated users' first login is part of the load: it makes their system accounts)."""
    names = [unique_name("ld") for _ in range(count)]

    def sign_up(index: int) -> None:
        # Sign-ups are limited to 20 an hour per address: each from a loopback address of
        # its own.
        client = HubClient(hub, f"127.0.7.{index + 1}")
        reply = client.sign_up(names[index], PASSWORD)
        assert reply.status_code == 200, f"sign-up of {names[index]}: {reply.status_code}"

    # bcrypt makes a sign-up cost ~0.3 s of CPU; two at a time keep both cores busy.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(sign_up, range(count)))
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    for name in names:
        reply = admin.form("/hub/twarga-accounts", {"action": "approve", "name": name})
        assert reply.status_code == 200 and f"{name} is approved" in reply.text, reply.text[:300]
    return [{"name": name, "password": PASSWORD} for name in names]


def remove_system_accounts(accounts: list[dict[str, str]]) -> None:
    """The system accounts the Hub made at the users' first logins outlive the Hub."""
    for account in accounts:
        subprocess.run(["userdel", "--remove", account["name"]], capture_output=True)
        subprocess.run(["groupdel", account["name"]], capture_output=True)


@dataclass
class Figures:
    """One request name's figures from a run."""

    name: str
    count: int
    p50: float  # ms
    p95: float  # ms
    statuses: dict[str, int]

    @property
    def server_errors(self) -> int:
        """Answers >= 500, and requests with no answer at all (status 0)."""
        return sum(n for code, n in self.statuses.items() if int(code) >= 500 or code == "0")

    @property
    def failures(self) -> int:
        return sum(n for code, n in self.statuses.items() if not 200 <= int(code) < 400)


@dataclass
class LoadRun:
    """A finished locust run: figures by request name and what went wrong."""

    duration: float
    figures: dict[str, Figures]
    problems: list[dict[str, Any]]
    lock_errors: list[dict[str, Any]]
    returncode: int
    log: Path

    def total(self, names: list[str]) -> int:
        return sum(self.figures[n].count for n in names if n in self.figures)

    def rate(self, names: list[str]) -> float:
        """Requests per second over the run, of the requests named."""
        return self.total(names) / self.duration if self.duration > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (what a reader checks by sorting): ``q`` in 0..100."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_locust(
    api_base: str,
    hub_url: str,
    accounts: list[dict[str, str]],
    workdir: Path,
    *,
    users: int = 50,
    spawn_rate: float = 10.0,
    seconds: int = 60,
    label: str = "run",
) -> LoadRun:
    """``users`` simulated users for ``seconds`` s against ``api_base`` (the Twarga API's
    base URL, ending in ``/twarga/api``), each logging in at ``hub_url`` first."""
    workdir.mkdir(parents=True, exist_ok=True)
    accounts_file = workdir / f"{label}-accounts.json"
    accounts_file.write_text(json.dumps(accounts))
    accounts_file.chmod(0o600)  # passwords
    summary_file = workdir / f"{label}-summary.json"
    log = workdir / f"{label}-locust.log"
    env = {
        **os.environ,
        "LOAD_HUB_URL": hub_url,
        "LOAD_ACCOUNTS": str(accounts_file),
        "LOAD_SUMMARY": str(summary_file),
    }
    argv = [
        str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "--host", api_base,
        "-u", str(users), "-r", str(spawn_rate), "-t", f"{seconds}s",
        # Users finish the round they are in: no VM is left half made by the stop.
        "--stop-timeout", "20", "--only-summary", "--loglevel", "WARNING",
        "--exit-code-on-error", "0",  # judged from the summary, with reasons
    ]  # fmt: skip
    with open(log, "wb") as out:
        done = subprocess.run(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 120
        )
    if not summary_file.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"locust wrote no summary (exit {done.returncode}):\n{tail}")
    raw = json.loads(summary_file.read_text())
    figures = {
        name: Figures(
            name=name,
            count=len(entry["times_ms"]),
            p50=percentile(entry["times_ms"], 50),
            p95=percentile(entry["times_ms"], 95),
            statuses=entry["statuses"],
        )
        for name, entry in raw["requests"].items()
    }
    return LoadRun(
        duration=raw["duration"],
        figures=figures,
        problems=raw["problems"],
        lock_errors=raw["lock_errors"],
        returncode=done.returncode,
        log=log,
    )


def table(run: LoadRun, title: str) -> str:
    """p50/p95 per request name and the run's requests per second, as printed."""
    lines = [
        f"{title}: {run.duration:.1f} s",
        f"  {'request':<34} {'count':>6} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}  statuses",
    ]
    for name in (
        LOGIN_REQUESTS
        + API_REQUESTS
        + sorted(set(run.figures) - set(LOGIN_REQUESTS + API_REQUESTS))
    ):
        f = run.figures.get(name)
        if f is None:
            lines.append(f"  {name:<34} {0:>6}")
            continue
        statuses = " ".join(f"{code}:{n}" for code, n in sorted(f.statuses.items()))
        lines.append(
            f"  {name:<34} {f.count:>6} {f.p50:>8.1f} {f.p95:>8.1f}"
            f" {f.count / run.duration:>7.1f}  {statuses}"
        )
    lines.append(f"  API requests/s: {run.rate(API_REQUESTS):.1f}")
    return "\n".join(lines)
