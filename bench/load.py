"""What the Hub and its proxy cost under load: the same locust scenario twice on one Hub.

50 simulated users (``tests/load/locustfile.py``) each log in through the Hub, then loop
for 60 s over listing, creating and destroying VMs (libvirt's test driver), the host's
metrics and their SOC events. One run sends the API requests straight to the twarga
service's own port, the other through the Hub's public port (configurable-http-proxy),
both with Hub-issued tokens (``Authorization: token ...``), so the service checks each
token with the Hub the same way in both. The logins go through the Hub in both runs: there
is no other way in.

The direct run comes first: the Hub run then starts on the fuller database (thousands of
VM rows and events more), so if anything the ratio overstates the Hub's cost.

    .venv/bin/python bench/load.py [--users 50] [--seconds 60]

Prints p50/p95 per request and the API requests per second of each run, and the ratios
(Hub+proxy / direct).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import make_placeholder_image  # noqa: E402
from tests.hub.conftest import HubProcess, prepare_hub  # noqa: E402
from tests.load import (  # noqa: E402
    API_REQUESTS,
    LoadRun,
    make_accounts,
    remove_system_accounts,
    run_locust,
    table,
)


def ratios(hub: LoadRun, direct: LoadRun) -> str:
    """Per API request, p50 and p95 through the Hub over direct; then the throughput."""
    lines = [f"  {'request':<20} {'p50 ratio':>10} {'p95 ratio':>10}"]
    for name in API_REQUESTS:
        h, d = hub.figures.get(name), direct.figures.get(name)
        if h is None or d is None:
            lines.append(f"  {name:<20} {'(missing)':>10}")
            continue
        lines.append(f"  {name:<20} {h.p50 / d.p50:>10.2f} {h.p95 / d.p95:>10.2f}")
    lines.append(
        f"  API requests/s: {hub.rate(API_REQUESTS):.1f} through the Hub, "
        f"{direct.rate(API_REQUESTS):.1f} direct: ratio "
        f"{hub.rate(API_REQUESTS) / direct.rate(API_REQUESTS):.2f}"
    )
    return "\n".join(lines)


def problems(run: LoadRun) -> list[str]:
    """What must not happen in either run: 5xx, no answer, database locks, refusals."""
    found = []
    for f in run.figures.values():
        if f.failures:
            found.append(f"{f.name}: {f.statuses}")
    if run.lock_errors:
        found.append(f"database-lock errors: {run.lock_errors[:3]}")
    if run.problems:
        found.append(f"first 5xx: {run.problems[:3]}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="twarga-bench-load-", dir="/tmp"))
    work.chmod(0o755)  # the Hub's users' accounts traverse it, as under the tests' /tmp
    images = work / "images"
    make_placeholder_image(images)
    root = work / "hub"
    env = prepare_hub(root, images, "test:///default", f"bl{uuid.uuid4().hex[:6]}-")
    hub = HubProcess(env, root)
    accounts: list[dict[str, str]] = []
    try:
        hub.start()
        accounts = make_accounts(hub, args.users)
        service = f"http://127.0.0.1:{env['TWARGA_SERVICE_PORT']}/services/twarga"
        runs = {}
        for label, api_base in [
            ("direct", f"{service}/twarga/api"),
            ("hub", f"{hub.url}/services/twarga/twarga/api"),
        ]:
            runs[label] = run_locust(
                api_base, hub.url, accounts, work / "load",
                users=args.users, seconds=args.seconds, label=label,
            )  # fmt: skip
        print(f"{args.users} users, {args.seconds} s each, libvirt test driver, 2 cores")
        print(table(runs["direct"], "straight to the service's port"))
        print(table(runs["hub"], "through the Hub's proxy"))
        print("Hub+proxy / direct:")
        print(ratios(runs["hub"], runs["direct"]))
        found = [f"{label}: {p}" for label, run in runs.items() for p in problems(run)]
        locked = [
            line for line in hub.log.read_text(errors="replace").splitlines()
            if "database is locked" in line
        ]  # fmt: skip
        found += [f"service log: {line}" for line in locked[:5]]
        for line in found:
            print(f"PROBLEM {line}")
        return 1 if found else 0
    finally:
        hub.stop()
        remove_system_accounts(accounts)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
