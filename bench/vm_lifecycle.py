"""Create-to-running time of a real guest: through Twarga's API vs. raw libvirt calls.

Both sides do the same work: a qcow2 overlay on the tiny image's base, the same domain XML,
define, start, and wait until libvirt reports the domain running. The API side adds HTTP,
validation, the quota transaction, events and the background task; its clock stops when
``GET /vms/{id}`` first says ``running``.

    .venv/bin/python bench/vm_lifecycle.py [--rounds 5]

Prints the medians and the ratio (goal: at most 1.2).
"""

from __future__ import annotations

import argparse
import json
import os
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

from twarga_lab.virt.domain import DiskSpec, DomainSpec, UserNetSpec, build_domain_xml  # noqa: E402
from twarga_lab.virt.images import ImageStore, create_overlay  # noqa: E402
from twarga_lab.virt.probe import resolve_domain_type  # noqa: E402

IMAGES = Path(os.environ.get("TWARGA_IMAGES_DIR", REPO / "vms" / "images"))
POLL = 0.01


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


def wait_until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(POLL)


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    image = ImageStore(IMAGES).get("twarga/tiny")
    domain_type = resolve_domain_type("auto", image.kernel, image.initrd, IMAGES / "kvm-probe.json")
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
            # One warm-up each, so neither side pays for first-use caches.
            bench_api(api, 1)
            bench_raw(work, 1, domain_type, prefix + "w")
            ours = bench_api(api, args.rounds)
            raw = bench_raw(work, args.rounds, domain_type, prefix)
        finally:
            server.terminate()
            server.wait(timeout=30)
    ours_median, raw_median = statistics.median(ours), statistics.median(raw)
    print(f"domain type: {domain_type}, rounds: {args.rounds}")
    print(
        f"create-to-running via Twarga API : median {ours_median * 1000:8.1f} ms  "
        f"{[round(t * 1000) for t in ours]}"
    )
    print(
        f"create-to-running via raw libvirt: median {raw_median * 1000:8.1f} ms  "
        f"{[round(t * 1000) for t in raw]}"
    )
    ratio = ours_median / raw_median
    print(f"ratio (API / raw): {ratio:.2f}  (goal <= 1.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
