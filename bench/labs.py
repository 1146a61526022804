"""Deploy time of a 3-VM lab to 5 students (15 real tiny guests): Twarga's labs API vs. raw
libvirt calls; and the host memory an idle tiny VM takes.

API side: five students (tokens of a bench identity provider, shaped like the Hub's) each
``POST /twarga/api/labs`` an inline three-machine template of ``twarga/tiny`` on one private
segment; the clock stops when ``GET /labs/{id}`` says ``running`` for all five labs (every
VM running). That covers the service's whole path: validation, the lab's quota and credit
transaction, the check key, overlays, seeds with host keys and segment addresses, one
``vde_switch`` per lab, domain XML, define, start.

Raw side, the same work by hand with libvirt-python in a loop: per lab a check key and a
``vde_switch``; per VM a qcow2 overlay on the tiny base, the tiny seed (host key, keys,
password hash, segment address), the same domain (``twarga_lab.virt.domain``: same kernel,
initrd, command line, size, user-mode NIC, segment NIC, syslog and control channels),
define, start; the clock stops when libvirt reports all 15 domains running. The service
builds a lab's VMs concurrently (its worker threads), so the raw side is also timed with a
pool of ``--raw-workers`` threads doing the same steps.

Rounds alternate which side goes first. After the first API round the guests are left to
boot (every VM ``ready``: its console banner came) and the RSS (and PSS) of their QEMU
processes is read from ``/proc``, divided by the VM count.

A deployment to a Hub group (``POST /deployments``) needs a JupyterHub for its members;
five students creating their lab is the same service path per lab without a Hub.

    .venv/bin/python bench/labs.py [--rounds 3] [--ram 512] [--raw-workers 6]

Prints the medians, the ratios (goal: at most 1.2 against the loop) and the memory per
idle VM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import libvirt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jupyter_server.auth.identity import IdentityProvider, User  # noqa: E402

from twarga_lab.virt.domain import (  # noqa: E402
    CONTROL_CHANNEL,
    SYSLOG_CHANNEL,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    UserNetSpec,
    build_domain_xml,
    segment_nics,
)
from twarga_lab.virt.images import (  # noqa: E402
    ImageStore,
    create_overlay,
    qemu_account,
    secure_instance_dir,
)
from twarga_lab.virt.probe import resolve_domain_type  # noqa: E402
from twarga_lab.virt.seed import (  # noqa: E402
    build_tiny_seed,
    generate_host_key,
    generate_password,
    sha512_crypt,
)
from twarga_lab.virt.switch import start_switch, stop_switch  # noqa: E402

IMAGES = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
STUDENTS = [f"student{i}" for i in range(1, 6)]
MACHINES = ("attacker", "target", "monitor")
CIDR, PREFIX_LEN = "10.79.0.0/24", 24
DISK_GB = 10  # the service's smallest VM disk (a qcow2 overlay: nothing is written)
POLL = 0.05
RUN_TIMEOUT = 300.0
READY_TIMEOUT = 240.0
SECRET_ENV = "TWARGA_BENCH_SECRET"


class BenchIdentityProvider(IdentityProvider):
    """Users from tokens ``<secret>-<name>`` (the secret from ``$TWARGA_BENCH_SECRET``),
    shaped like the Hub's (``user.hub_user``), so one server serves five students."""

    def get_user(self, handler: Any) -> User | None:
        scheme, _, token = handler.request.headers.get("Authorization", "").partition(" ")
        secret = os.environ.get(SECRET_ENV, "")
        if scheme.lower() != "token" or not secret or not token.startswith(secret + "-"):
            return None
        name = token.removeprefix(secret + "-")
        if name not in [*STUDENTS, "teacher"]:
            return None
        handler._token_authenticated = True
        user = User(username=name, name=name)
        user.hub_user = {"name": name, "admin": name == "teacher"}  # type: ignore[attr-defined]
        return user


def template(ram: int) -> dict[str, Any]:
    """The inline lab template: three tiny machines on one segment."""
    return {
        "schema": "twarga-lab-template/v1",
        "name": "bench-three",
        "title": "Three tiny machines on one segment",
        "networks": [{"name": "lan", "cidr": CIDR}],
        "machines": [
            {
                "name": name,
                "image": "twarga/tiny",
                "cpu": 1,
                "ram": ram,
                "disk": DISK_GB,
                "networks": [{"network": "lan", "address": f"10.79.0.{11 + i}"}],
            }
            for i, name in enumerate(MACHINES)
        ],
        "checks": [{"name": "target answers", "machine": "attacker", "run": "true"}],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.base}/twarga/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read().decode()
            try:
                return e.code, json.loads(text or "null")
            except ValueError:
                return e.code, text


def wait_until(predicate, timeout: float, poll: float = POLL, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(poll)


def start_server(work: Path, secret: str, port: int, prefix: str) -> subprocess.Popen[bytes]:
    argv = [
        str(REPO / ".venv" / "bin" / "jupyter"),
        "server",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ip=127.0.0.1",
        "--ServerApp.identity_provider_class=bench.labs.BenchIdentityProvider",
        f"--ServerApp.root_dir={work}",
        "--TwargaLabApp.libvirt_uri=qemu:///system",
        f"--TwargaLabApp.vms_dir={work / 'vms'}",
        f"--TwargaLabApp.images_dir={IMAGES}",
        f"--TwargaLabApp.domain_prefix={prefix}",
        "--TwargaLabApp.max_vms_per_user=50",
        "--TwargaLabApp.max_ram_per_user_mb=100000",
        "--TwargaLabApp.ssh_port_min=24000",
        "--TwargaLabApp.ssh_port_max=24999",
        "--TwargaLabApp.syslog_address=127.0.0.1:0",  # not 5514, which a Hub may hold
    ]
    env = {**os.environ, SECRET_ENV: secret, "PYTHONPATH": str(REPO)}
    log = open(work / "server.log", "wb")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=work, env=env)


# -- the API side -------------------------------------------------------------------------


def api_deploy(apis: dict[str, Api], name: str, ram: int) -> tuple[float, list[tuple[Api, int]]]:
    """Every student POSTs the lab; seconds until all five labs run, and the labs."""
    body = {"template": template(ram), "name": name}
    t0 = time.perf_counter()
    labs = []
    for student in STUDENTS:
        status, lab = apis[student].call("POST", "labs", body)
        if status != 201:
            raise RuntimeError(f"POST /labs for {student}: {status} {lab}")
        labs.append((apis[student], lab["id"]))
    pending = list(labs)

    def all_running() -> bool:
        for api, lab_id in list(pending):
            status, lab = api.call("GET", f"labs/{lab_id}")
            if status != 200 or lab["status"] == "error":
                raise RuntimeError(f"lab {lab_id}: {status} {lab}")
            if lab["status"] == "running":
                pending.remove((api, lab_id))
        return not pending

    wait_until(all_running, RUN_TIMEOUT, what="every lab running")
    return time.perf_counter() - t0, labs


def api_destroy(labs: list[tuple[Api, int]], conn: libvirt.virConnect, prefix: str) -> None:
    for api, lab_id in labs:
        status, answer = api.call("DELETE", f"labs/{lab_id}")
        if status not in (200, 204):
            raise RuntimeError(f"DELETE /labs/{lab_id}: {status} {answer}")

    def gone() -> bool:
        return not [d for d in conn.listAllDomains() if d.name().startswith(prefix)]

    wait_until(gone, 120, 0.2, "the API's domains to go")


def wait_ready(labs: list[tuple[Api, int]], timeout: float) -> int:
    """Until every VM of the labs says ``ready`` (its guest booted), at most ``timeout``
    seconds (a TCG guest on an overloaded host may panic at boot); how many are ready."""
    count = 0

    def ready() -> bool:
        nonlocal count
        vms = [vm for api, lab_id in labs for vm in api.call("GET", f"labs/{lab_id}")[1]["vms"]]
        count = sum(1 for vm in vms if vm.get("ready"))
        return count == len(vms)

    with contextlib.suppress(TimeoutError):
        wait_until(ready, timeout, 1.0, "every guest ready")
    return count


# -- the raw side -------------------------------------------------------------------------


def raw_deploy(
    conn: libvirt.virConnect, work: Path, domain_type: str, prefix: str, ram: int, workers: int
) -> tuple[float, list[libvirt.virDomain], list[Path]]:
    """The same 5 x 3 domains by hand, in a loop (``workers=1``) or by a pool of threads;
    seconds until libvirt says all 15 run."""
    from twarga_lab.services.labs.checks import make_check_key

    image = ImageStore(IMAGES).get("twarga/tiny")
    owner = qemu_account()
    switches = [work / "raw" / "sw" / str(n) for n in range(len(STUDENTS))]

    def make_lab(n: int) -> str:
        check_pub = make_check_key(work / "raw" / "labs" / STUDENTS[n])
        start_switch(switches[n], owner=owner)
        return check_pub

    def make_vm(n: int, i: int, check_pub: str) -> libvirt.virDomain:
        student, machine = STUDENTS[n], MACHINES[i]
        name = f"{prefix}{student}-{machine}"
        folder = work / "raw" / name
        mac = f"52:54:00:7b:{n:02x}:{i + 1:02x}"
        create_overlay(image.base_disk, folder / "disk.qcow2", DISK_GB)
        with tempfile.TemporaryDirectory(prefix="bench-hostkey-") as tmp:
            generate_host_key(Path(tmp) / "host_key")
            build_tiny_seed(
                folder / "twarga-seed.iso",
                authorized_keys=[check_pub],
                root_password_hash=sha512_crypt(generate_password()),
                host_key=Path(tmp) / "host_key",
                segments=[(mac, f"10.79.0.{11 + i}/{PREFIX_LEN}")],
            )
        secure_instance_dir(folder, owner)
        spec = DomainSpec(
            name=name,
            memory_mib=ram,
            vcpus=1,
            domain_type=domain_type,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=(
                ("console", "ttyS0"),
                ("quiet", ""),
                ("twarga.name", f"{student}-{machine}"),
                ("twarga.ssh", "1"),
            ),
            disks=(
                DiskSpec(folder / "disk.qcow2", target="vda"),
                DiskSpec(folder / "twarga-seed.iso", target="vdb", format="raw", readonly=True),
            ),
            console_log=folder / "console.log",
            network=UserNetSpec(ssh_host_port=free_port()),
            segments=segment_nics([switches[n]], [mac]),
            channels=(ChannelSpec(SYSLOG_CHANNEL), ChannelSpec(CONTROL_CHANNEL)),
        )
        dom = conn.defineXML(build_domain_xml(spec))
        dom.create()
        return dom

    t0 = time.perf_counter()
    labs = range(len(STUDENTS))
    vms = [(n, i) for n in labs for i in range(len(MACHINES))]
    if workers <= 1:
        keys = [make_lab(n) for n in labs]
        domains = [make_vm(n, i, keys[n]) for n, i in vms]
    else:
        with ThreadPoolExecutor(workers) as pool:
            keys = list(pool.map(make_lab, labs))
            domains = list(pool.map(lambda vm: make_vm(*vm, keys[vm[0]]), vms))

    def all_running() -> bool:
        return all(d.state()[0] == libvirt.VIR_DOMAIN_RUNNING for d in domains)

    wait_until(all_running, RUN_TIMEOUT, what="every raw domain running")
    return time.perf_counter() - t0, domains, switches


def raw_destroy(domains: list[libvirt.virDomain], switches: list[Path], work: Path) -> None:
    for dom in domains:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    for switch in switches:
        stop_switch(switch)
    subprocess.run(["rm", "-rf", str(work / "raw")], check=False)


def stop_leftover_switches(work: Path) -> None:
    """SIGTERM every ``vde_switch`` serving a folder under ``work`` (a lab the bench could
    not destroy leaves its switch running: switches outlive the service by design)."""
    inside = os.fsencode(str(work)) + b"/"
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"vde_switch":
            folders = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == b"-s"]
            if any(f.startswith(inside) for f in folders):
                with contextlib.suppress(OSError):
                    os.kill(int(proc.name), signal.SIGTERM)


# -- memory -------------------------------------------------------------------------------


def qemu_memory(prefix: str) -> tuple[int, int, int]:
    """(count, RSS kB, PSS kB) of the QEMU processes of domains named ``prefix...``."""
    count = rss = pss = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not argv or b"qemu-system" not in argv[0]:
                continue
            names = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == b"-name"]
            if not any(n.split(b",")[0].removeprefix(b"guest=").startswith(prefix.encode())
                       for n in names):  # fmt: skip
                continue
            status = (proc / "status").read_text()
            rollup = (proc / "smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        rss += _kb(status, "VmRSS:")
        pss += _kb(rollup, "Pss:")
    return count, rss, pss


def _kb(text: str, key: str) -> int:
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def idle_memory(prefix: str, expected: int) -> tuple[int, int, int]:
    """The QEMU memory once it settles (two readings 2 s apart within 2 %, at most 30 s)."""
    deadline = time.monotonic() + 30
    last = qemu_memory(prefix)
    while True:
        time.sleep(2)  # the readings' interval
        now = qemu_memory(prefix)
        if now[0] == expected and abs(now[1] - last[1]) <= 0.02 * max(last[1], 1):
            return now
        if time.monotonic() > deadline:
            return now
        last = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--ram", type=int, default=512, help="MiB per VM, both sides (the service: 512 at least)"
    )
    parser.add_argument(
        "--raw-workers",
        type=int,
        default=6,
        help="also time the raw side with this many threads (the service builds a lab's VMs "
        "concurrently in its worker threads; 1: the loop only)",
    )
    args = parser.parse_args()
    tiny = ImageStore(IMAGES).get("twarga/tiny")
    domain_type = resolve_domain_type("auto", tiny.kernel, tiny.initrd, IMAGES / "kvm-probe.json")
    prefix = f"b{secrets.token_hex(2)}-"
    runs = REPO / "vms" / "bench-runs"
    runs.mkdir(parents=True, exist_ok=True)
    runs.chmod(0o755)
    ours: list[float] = []
    raw: list[float] = []
    pooled: list[float] = []
    memory: tuple[int, int, int, int] | None = None
    conn = libvirt.open("qemu:///system")
    # libvirt's QEMU user must reach the disks: not under a 0700 temporary folder; and a
    # switch's socket path must stay short (UNIX sockets: 107 bytes).
    with tempfile.TemporaryDirectory(prefix="labs-", dir=runs) as tmp:
        Path(tmp).chmod(0o755)
        work = Path(tmp)
        secret, port = secrets.token_hex(16), free_port()
        server = start_server(work, secret, port, prefix)
        try:
            apis = {u: Api(f"http://127.0.0.1:{port}", f"{secret}-{u}") for u in STUDENTS}

            def up() -> bool:
                try:
                    return apis[STUDENTS[0]].call("GET", "lab-templates")[0] == 200
                except OSError:
                    return False

            wait_until(up, 60, 0.2, "the server")
            for i in range(args.rounds):

                def api_round(i: int = i) -> None:
                    nonlocal memory
                    took, labs = api_deploy(apis, f"bench-{i}", args.ram)
                    ours.append(took)
                    try:
                        if memory is None:
                            booted = wait_ready(labs, READY_TIMEOUT)
                            memory = (booted, *idle_memory(prefix, len(STUDENTS) * len(MACHINES)))
                    finally:
                        api_destroy(labs, conn, prefix)

                def raw_round(i: int = i, workers: int = 1) -> None:
                    took, domains, switches = raw_deploy(
                        conn, work, domain_type, f"{prefix}r{i}{workers}-", args.ram, workers
                    )
                    (raw if workers == 1 else pooled).append(took)
                    raw_destroy(domains, switches, work)

                sides = [
                    api_round,
                    raw_round,
                    lambda i=i: raw_round(i, args.raw_workers),
                ][: 3 if args.raw_workers > 1 else 2]
                turn = i % len(sides)
                for side in sides[turn:] + sides[:turn]:
                    side()
                line = f"  round {i + 1}: API {ours[-1]:.2f} s, raw loop {raw[-1]:.2f} s"
                if pooled:
                    line += f", raw {args.raw_workers} threads {pooled[-1]:.2f} s"
                print(line, flush=True)
        except BaseException:
            log = (work / "server.log").read_text(errors="replace").splitlines()
            print("the server's log ends with:", *log[-40:], sep="\n  ", file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(timeout=60)
            for dom in conn.listAllDomains():
                if dom.name().startswith(prefix):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
            conn.close()
            stop_leftover_switches(work)
    vms = len(STUDENTS) * len(MACHINES)
    print(
        f"image: twarga/tiny, domain type: {domain_type}, {len(STUDENTS)} students x "
        f"{len(MACHINES)} VMs = {vms} VMs of {args.ram} MiB, rounds: {args.rounds}"
    )
    ours_median, raw_median = statistics.median(ours), statistics.median(raw)
    print(f"deploy-to-running via Twarga API : median {ours_median:7.2f} s  "
          f"{[round(t, 2) for t in ours]}")  # fmt: skip
    print(f"deploy-to-running via raw libvirt: median {raw_median:7.2f} s  "
          f"{[round(t, 2) for t in raw]}")  # fmt: skip
    print(f"ratio (API / raw loop): {ours_median / raw_median:.2f}  (goal <= 1.2)")
    if pooled:
        pooled_median = statistics.median(pooled)
        print(f"deploy-to-running via raw libvirt, {args.raw_workers} threads: median "
              f"{pooled_median:7.2f} s  {[round(t, 2) for t in pooled]}")  # fmt: skip
        print(f"ratio (API / raw, {args.raw_workers} threads): {ours_median / pooled_median:.2f}")
    if memory is not None:
        booted, count, rss, pss = memory
        print(
            f"host memory per idle tiny VM ({count} QEMU processes, {booted} guests booted): "
            f"RSS {rss / count / 1024:.1f} MiB, PSS {pss / count / 1024:.1f} MiB "
            f"(total RSS {rss / 1024:.0f} MiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
