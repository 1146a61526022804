"""Decide whether guests run with KVM or with QEMU's TCG emulator.

``/dev/kvm`` existing is not enough: on some hosts (nested virtualisation, restricted
containers) KVM guests hang. The probe boots the tiny image once under KVM with
``twarga.probe=1`` and waits for ``TWARGA-PROBE-OK`` on the serial port; the answer is cached
per host so it runs once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import selectors
import subprocess
import tempfile
import time
from pathlib import Path

from twarga_lab.virt.tinyimage import read_kernel_version

__all__ = [
    "DOMAIN_TYPE_SETTINGS",
    "KVM_DEVICE",
    "PROBE_MARKER",
    "kvm_usable",
    "probe_command",
    "resolve_domain_type",
    "run_until_marker",
]

log = logging.getLogger(__name__)

PROBE_MARKER = "TWARGA-PROBE-OK"
KVM_DEVICE = Path("/dev/kvm")
DOMAIN_TYPE_SETTINGS = frozenset({"auto", "kvm", "qemu"})
_CACHE_FORMAT = 1


def probe_command(
    kernel: Path, initrd: Path, *, accel: str = "kvm", qemu: str = "qemu-system-x86_64"
) -> list[str]:
    """The QEMU argv that boots the tiny image in probe mode (no network, serial on stdout)."""
    return [
        qemu,
        "-nographic",
        "-monitor", "none",  # -nographic would put the monitor on stdio too
        "-serial", "stdio",
        "-no-reboot",
        "-m", "256",
        "-accel", accel,
        "-nic", "none",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", "console=ttyS0 twarga.probe=1 panic=-1",
    ]  # fmt: skip


def run_until_marker(argv: list[str], marker: str, timeout: float) -> bool:
    """Run ``argv`` until ``marker`` appears on its stdout or ``timeout`` seconds pass.

    The process is always killed (and reaped) before returning, whatever happened.
    Returns True if the marker was seen in time.
    """
    needle = marker.encode()
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        log.warning("cannot run %s: %s", argv[0], exc)
        return False
    assert proc.stdout is not None
    seen = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.info("%s: no %s within %.1fs", argv[0], marker, timeout)
                    return False
                if not selector.select(remaining):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # the process exited (or closed stdout) without the marker
                    log.info("%s exited without %s: %r", argv[0], marker, seen[-300:])
                    return False
                # Keep only a tail long enough to find a marker split across reads.
                seen = (seen + chunk)[-(len(needle) + 65536) :]
                if needle in seen:
                    return True
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
            log.error("%s (pid %d) did not die after SIGKILL", argv[0], proc.pid)
        proc.stdout.close()


def kvm_usable(
    kernel: Path, initrd: Path, *, timeout: float = 20.0, qemu: str = "qemu-system-x86_64"
) -> bool:
    """True if the tiny image boots under KVM and prints the probe marker within ``timeout``.

    QEMU is killed at the deadline; nothing is left running.
    """
    argv = probe_command(kernel, initrd, accel="kvm", qemu=qemu)
    return run_until_marker(argv, PROBE_MARKER, timeout)


def _host_key(kernel: Path) -> dict[str, str]:
    version = read_kernel_version(kernel) or kernel.name
    return {"host_kernel": platform.release(), "kernel_version": version}


def _read_cache(cache_file: Path, key: dict[str, str]) -> str | None:
    try:
        data = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return None
    if any(data.get(k) != v for k, v in key.items()):
        return None
    answer = data.get("answer")
    return answer if answer in ("kvm", "qemu") else None


def _write_cache(cache_file: Path, key: dict[str, str], answer: str) -> None:
    data = {"format": _CACHE_FORMAT, **key, "answer": answer, "probed_at": int(time.time())}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2)
                f.write("\n")
            os.replace(tmp, cache_file)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        log.warning("cannot cache the KVM probe in %s: %s", cache_file, exc)


def resolve_domain_type(
    setting: str,
    kernel: Path | None,
    initrd: Path | None,
    cache_file: Path | None,
    *,
    timeout: float = 20.0,
) -> str:
    """The libvirt domain type to use: ``kvm`` or ``qemu``.

    ``kvm`` and ``qemu`` are returned as they are, without probing. ``auto`` gives ``kvm`` only
    if ``/dev/kvm`` exists and :func:`kvm_usable` boots the tiny image (``kernel``,
    ``initrd``) within ``timeout``; otherwise ``qemu``. The probe's answer is cached in
    ``cache_file`` (JSON: host and guest kernel versions + answer) and reused while both
    versions match.
    """
    if setting not in DOMAIN_TYPE_SETTINGS:
        raise ValueError(f"domain type must be one of auto, kvm, qemu; not {setting!r}")
    if setting != "auto":
        return setting
    if not KVM_DEVICE.exists():
        log.info("%s does not exist: using qemu (TCG)", KVM_DEVICE)
        return "qemu"
    if kernel is None or initrd is None:
        log.info("no tiny image to probe KVM with: using qemu (TCG)")
        return "qemu"
    kernel, initrd = Path(kernel), Path(initrd)
    key = _host_key(kernel)
    if cache_file is not None:
        cached = _read_cache(Path(cache_file), key)
        if cached is not None:
            return cached
    started = time.monotonic()
    answer = "kvm" if kvm_usable(kernel, initrd, timeout=timeout) else "qemu"
    log.info("KVM probe: %s (%.1fs)", answer, time.monotonic() - started)
    if cache_file is not None:
        _write_cache(Path(cache_file), key, answer)
    return answer
