"""Create-to-running time of a real guest: through Twarga's API vs. raw libvirt calls.

Both sides do the same work: a qcow2 overlay on the tiny image's base, the same domain XML,
define, start, and wait until libvirt reports the domain running. The API side adds HTTP,
validation, the quota transaction, events and the background task; its clock stops when
``GET /vms/{id}`` first says ``running``.

With ``--image debian/12`` it is create-to-ready: the API side stops its clock when the VM's
JSON first says ``"ready": true`` (the service saw cloud-init's final banner on the serial
console); the raw side builds the same overlay, the same cloud-init seed (same user, a
password hash, the SOC's rsyslog drop-in) and the same domain XML with
``twarga_lab.virt.domain``, starts it, and reads the console log by hand until the image's
``ready_banner`` appears. Rounds alternate between the two sides (the guest's boot, minutes
under TCG, drifts with the machine's load), without a warm-up.

    .venv/bin/python bench/vm_lifecycle.py [--rounds 5]
    .venv/bin/python bench/vm_lifecycle.py --image debian/12 [--rounds 2]

Prints the medians and the ratio (goal: at most 1.2 to running, 1.1 to ready).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import libvirt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from twarga_lab.virt.domain import (  # noqa: E402
    SYSLOG_CHANNEL,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    UserNetSpec,
    build_domain_xml,
)
from twarga_lab.virt.images import Image, ImageStore, build_seed_iso, create_overlay  # noqa: E402
from twarga_lab.virt.probe import resolve_domain_type  # noqa: E402
from twarga_lab.virt.seed import generate_password, sha512_crypt  # noqa: E402

IMAGES = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
POLL = 0.01
READY_POLL = 0.1  # a boot takes minutes: 100 requests a second would slow the guest down
READY_TIMEOUT = 900.0
DEBIAN_RAM = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token

    def call(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.base}/twarga/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode() or "null")


def wait_until(predicate, timeout: float = 120.0, poll: float = POLL) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(poll)


def start_server(work: Path, token: str, port: int, prefix: str) -> subprocess.Popen[bytes]:
    argv = [
        str(REPO / ".venv" / "bin" / "jupyter"),
        "server",
        "--no-browser",
        "--allow-root",
        f"--port={port}",
        "--ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
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
    log = open(work / "server.log", "wb")  # noqa: SIM115
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=work)


def bench_api(api: Api, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        status, vm = api.call("POST", "vms", {"name": f"bench-{i}"})
        assert status == 201, vm
        vm_id = vm["id"]  # type: ignore[index]

        def running(vm_id: int = vm_id) -> bool:
            got = api.call("GET", f"vms/{vm_id}")[1]
            if got["status"] == "error":  # type: ignore[index]
                raise RuntimeError(f"VM failed: {got['status_message']}")  # type: ignore[index]
            return got["status"] == "running"  # type: ignore[index]

        wait_until(running)
        times.append(time.perf_counter() - t0)
        assert api.call("DELETE", f"vms/{vm_id}")[0] == 204
    return times


def bench_raw(work: Path, rounds: int, domain_type: str, prefix: str) -> list[float]:
    image = ImageStore(IMAGES).get("twarga/tiny")
    conn = libvirt.open("qemu:///system")
    times = []
    for i in range(rounds):
        name = f"{prefix}raw-{i}"
        folder = work / "raw" / name
        t0 = time.perf_counter()
        create_overlay(image.base_disk, folder / "disk.qcow2", 10)
        spec = DomainSpec(
            name=name,
            memory_mib=512,
            vcpus=1,
            domain_type=domain_type,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=(("console", "ttyS0"), ("quiet", ""), ("twarga.name", f"raw-{i}")),
            disks=(DiskSpec(folder / "disk.qcow2"),),
            console_log=folder / "console.log",
            network=UserNetSpec(ssh_host_port=25000 + i),
        )
        dom = conn.defineXML(build_domain_xml(spec))
        dom.create()
        wait_until(lambda d=dom: d.state()[0] == libvirt.VIR_DOMAIN_RUNNING)
        times.append(time.perf_counter() - t0)
        dom.destroy()
        dom.undefine()
    conn.close()
    return times


def api_ready_round(api: Api, name: str, image: str) -> float:
    """POST a VM of ``image`` and poll it until ``ready``; the seconds it took."""
    t0 = time.perf_counter()
    status, vm = api.call(
        "POST", "vms", {"name": name, "image": image, "ram": DEBIAN_RAM, "cpu": 1, "disk": 10}
    )
    assert status == 201, vm
    vm_id = vm["id"]  # type: ignore[index]

    def ready() -> bool:
        got = api.call("GET", f"vms/{vm_id}")[1]
        if got["status"] == "error":  # type: ignore[index]
            raise RuntimeError(f"VM failed: {got['status_message']}")  # type: ignore[index]
        return got["status"] == "running" and got["ready"] is True  # type: ignore[index]

    try:
        wait_until(ready, timeout=READY_TIMEOUT, poll=READY_POLL)
        return time.perf_counter() - t0
    finally:
        assert api.call("DELETE", f"vms/{vm_id}")[0] == 204


def console_has(path: Path, banner: re.Pattern[str]) -> bool:
    """Whether a line of the console log ``path`` matches ``banner`` (read by hand)."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return False
    return any(banner.search(line.rstrip("\r")) for line in text.split("\n"))


def raw_ready_round(
    conn: libvirt.virConnect, work: Path, image: Image, name: str, domain_type: str
) -> float:
    """What the service does for a cloud image, with raw libvirt calls; the seconds from
    the first file to the banner in the console log."""
    assert image.ready_banner, f"{image.name} has no ready_banner"
    banner = re.compile(image.ready_banner)
    folder = work / "raw" / name
    t0 = time.perf_counter()
    create_overlay(image.base_disk, folder / "disk.qcow2", 10)
    build_seed_iso(
        folder / "seed.iso",
        instance_id=name,
        hostname=name,
        ssh_keys=[],
        user=image.default_user or "twarga",
        password_hash=sha512_crypt(generate_password()),
        syslog_channel=SYSLOG_CHANNEL,
    )
    spec = DomainSpec(
        name=name,
        memory_mib=DEBIAN_RAM,
        vcpus=1,
        domain_type=domain_type,
        kernel=image.kernel,
        initrd=image.initrd,
        cmdline=image.cmdline,
        disks=(
            DiskSpec(folder / "disk.qcow2", target="vda"),
            DiskSpec(folder / "seed.iso", target="hdc", format="raw", device="cdrom", bus="ide"),
        ),
        console_log=folder / "console.log",
        network=UserNetSpec(ssh_host_port=free_port()),
        channels=(ChannelSpec(SYSLOG_CHANNEL),),
    )
    dom = conn.defineXML(build_domain_xml(spec))
    try:
        dom.create()
        wait_until(
            lambda: console_has(folder / "console.log", banner),
            timeout=READY_TIMEOUT,
            poll=READY_POLL,
        )
        return time.perf_counter() - t0
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def bench_ready(api: Api, work: Path, image: Image, rounds: int, domain_type: str, prefix: str):
    """Alternating rounds of create-to-ready through the API and with raw libvirt."""
    conn = libvirt.open("qemu:///system")
    ours: list[float] = []
    raw: list[float] = []
    try:
        for i in range(rounds):
            sides = [
                lambda i=i: ours.append(api_ready_round(api, f"ready-{i}", image.name)),
                lambda i=i: raw.append(
                    raw_ready_round(conn, work, image, f"{prefix}raw-{i}", domain_type)
                ),
            ]
            for side in sides if i % 2 == 0 else sides[::-1]:
                side()
            print(f"  round {i + 1}: API {ours[-1]:.1f} s, raw {raw[-1]:.1f} s", flush=True)
    finally:
        conn.close()
    return ours, raw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--image",
        default="twarga/tiny",
        help="twarga/tiny: create-to-running; an image with a ready_banner (debian/12): "
        "create-to-ready",
    )
    args = parser.parse_args()
    store = ImageStore(IMAGES)
    tiny = store.get("twarga/tiny")
    image = store.get(args.image)
    to_ready = image.name != tiny.name
    domain_type = resolve_domain_type("auto", tiny.kernel, tiny.initrd, IMAGES / "kvm-probe.json")
    prefix = f"bench{secrets.token_hex(3)}-"
    runs = REPO / "vms" / "bench-runs"
    runs.mkdir(parents=True, exist_ok=True)
    runs.chmod(0o755)
    # libvirt's QEMU user must reach the disks: not under a 0700 temporary folder.
    with tempfile.TemporaryDirectory(prefix="vm-lifecycle-", dir=runs) as tmp:
        Path(tmp).chmod(0o755)
        work = Path(tmp)
        token, port = secrets.token_hex(16), free_port()
        server = start_server(work, token, port, prefix)
        try:
            api = Api(f"http://127.0.0.1:{port}", token)

            def up() -> bool:
                try:
                    return api.call("GET", "me")[0] == 200
                except OSError:
                    return False

            wait_until(up, timeout=60)
            if to_ready:
                ours, raw = bench_ready(api, work, image, args.rounds, domain_type, prefix)
            else:
                # One warm-up each, so neither side pays for first-use caches.
                bench_api(api, 1)
                bench_raw(work, 1, domain_type, prefix + "w")
                ours = bench_api(api, args.rounds)
                raw = bench_raw(work, args.rounds, domain_type, prefix)
        finally:
            server.terminate()
            server.wait(timeout=30)
    ours_median, raw_median = statistics.median(ours), statistics.median(raw)
    what, goal = ("create-to-ready  ", 1.1) if to_ready else ("create-to-running", 1.2)
    print(f"image: {image.name}, domain type: {domain_type}, rounds: {args.rounds}")
    print(
        f"{what} via Twarga API : median {ours_median * 1000:9.1f} ms  "
        f"{[round(t * 1000) for t in ours]}"
    )
    print(
        f"{what} via raw libvirt: median {raw_median * 1000:9.1f} ms  "
        f"{[round(t * 1000) for t in raw]}"
    )
    ratio = ours_median / raw_median
    print(f"ratio (API / raw): {ratio:.2f}  (goal <= {goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
