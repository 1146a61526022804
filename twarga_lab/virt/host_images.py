"""Copies of the bootable images on a hypervisor host with storage of its own.

A host whose entry in ``TwargaLabApp.host_image_dirs`` names a folder (on that host) gets
its copy of an image the first time a VM of that image is placed on it: a libvirt ``dir``
storage pool (``twarga-images``) at that folder, one volume per file of the image (its
base disk, kernel and initrd), uploaded through a libvirt stream, which works over the
remote protocol (``qemu+ssh://``, ``qemu+tls://``) as well as on this machine. Progress is
kept per image (``ImageCopy``) for ``GET /twarga/api/hosts`` and the VM's status message.

A marker volume (``<key>.ok``) is written once every file is complete, so a copy
interrupted by a crash is made again rather than used half written. The key holds a hash
of the files' sizes and times: a rebuilt image is copied afresh.

Blocking calls: run them in worker threads. No tornado here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from twarga_lab.errors import BackendError
from twarga_lab.virt.images import Image

POOL_NAME = "twarga-images"
CHUNK = 1024 * 1024


@dataclass
class ImageCopy:
    """The state of one image's copy on one host."""

    image: str
    host: str
    total_bytes: int
    copied_bytes: int = 0
    state: str = "copying"  # copying, ready or failed
    error: str | None = None
    seconds: float | None = None

    @property
    def percent(self) -> float:
        return round(100.0 * self.copied_bytes / self.total_bytes, 1) if self.total_bytes else 100.0

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "state": self.state,
            "bytes": self.copied_bytes,
            "total_bytes": self.total_bytes,
            "percent": self.percent,
            "seconds": self.seconds,
            "error": self.error,
        }


def pool_xml(name: str, folder: str) -> str:
    """A ``dir`` storage pool at ``folder``."""
    pool = ET.Element("pool", type="dir")
    ET.SubElement(pool, "name").text = name
    target = ET.SubElement(pool, "target")
    ET.SubElement(target, "path").text = folder
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0755"
    return ET.tostring(pool, encoding="unicode")


def volume_xml(name: str, size: int) -> str:
    """A raw volume of ``size`` bytes, readable by the host's QEMU account."""
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(size)
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="raw")
    permissions = ET.SubElement(target, "permissions")
    ET.SubElement(permissions, "mode").text = "0644"
    return ET.tostring(volume, encoding="unicode")


def image_files(image: Image) -> dict[str, Path]:
    """The files a VM of ``image`` needs, by the ``Image`` field that names each."""
    files = {"base_disk": image.base_disk}
    if image.kernel is not None:
        files["kernel"] = image.kernel
    if image.initrd is not None:
        files["initrd"] = image.initrd
    return files


def copy_key(image: Image) -> str:
    """A volume-name prefix for this build of ``image``."""
    digest = hashlib.sha256()
    for field, path in sorted(image_files(image).items()):
        stat = path.stat()
        digest.update(f"{field}:{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"{image.name.replace('/', '-')}-{digest.hexdigest()[:10]}"


Call = Callable[[Callable[[libvirt.virConnect], Any], str], Any]


class HostImageCache:
    """The images of one host with its own storage, copied there on first use."""

    def __init__(self, host: str, call: Call, folder: str) -> None:
        self.host = host
        self.call = call  # the host's ``backend.call``: its connection, errors translated
        self.folder = folder.rstrip("/")
        self.copies: dict[str, ImageCopy] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, image: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(image, threading.Lock())

    def _pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        try:
            pool = conn.storagePoolLookupByName(POOL_NAME)
        except libvirt.libvirtError:
            pool = conn.storagePoolDefineXML(pool_xml(POOL_NAME, self.folder), 0)
            pool.build(0)
            with contextlib.suppress(libvirt.libvirtError):
                pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
        pool.refresh(0)
        return pool

    def path_of(self, key: str, field: str, source: Path) -> str:
        """Where the host keeps one file of an image."""
        return f"{self.folder}/{key}-{field}{source.suffix}"

    def localized(self, image: Image, key: str) -> Image:
        """``image`` with its files' paths on the host."""
        changes = {f: Path(self.path_of(key, f, p)) for f, p in image_files(image).items()}
        return dataclasses.replace(image, **changes)

    def ensure(self, image: Image, on_progress: Callable[[ImageCopy], None]) -> Image:
        """``image`` as the host has it, copied there first if it is not (or only half).

        ``on_progress`` hears the copy's state after every few MB. ``BackendError`` if the
        copy fails (the host's storage refused it)."""
        key = copy_key(image)
        with self._lock(image.name):
            done = self.call(lambda conn: self._has_marker(conn, key), "look for an image copy")
            if done:
                copy = self.copies.get(image.name)
                if copy is None or copy.state != "ready":
                    total = sum(p.stat().st_size for p in image_files(image).values())
                    self.copies[image.name] = ImageCopy(
                        image.name, self.host, total, total, state="ready", seconds=None
                    )
                return self.localized(image, key)
            files = image_files(image)
            copy = ImageCopy(image.name, self.host, sum(p.stat().st_size for p in files.values()))
            self.copies[image.name] = copy
            started = time.monotonic()
            try:
                self.call(
                    lambda conn: self._upload_all(conn, key, files, copy, on_progress),
                    f"copy image {image.name} to host {self.host}",
                )
            except Exception as e:
                copy.state = "failed"
                copy.error = getattr(e, "message", None) or str(e)
                on_progress(copy)
                raise BackendError(
                    f"could not copy image {image.name} to host {self.host}: {copy.error}"
                ) from e
            copy.state, copy.seconds = "ready", round(time.monotonic() - started, 2)
            on_progress(copy)
            return self.localized(image, key)

    def _has_marker(self, conn: libvirt.virConnect, key: str) -> bool:
        pool = self._pool(conn)
        try:
            pool.storageVolLookupByName(f"{key}.ok")
        except libvirt.libvirtError:
            return False
        return True

    def _upload_all(
        self,
        conn: libvirt.virConnect,
        key: str,
        files: dict[str, Path],
        copy: ImageCopy,
        on_progress: Callable[[ImageCopy], None],
    ) -> None:
        pool = self._pool(conn)
        reported = [0]

        def sent(count: int) -> None:
            copy.copied_bytes += count
            if (
                copy.copied_bytes - reported[0] >= 4 * CHUNK
                or copy.copied_bytes == copy.total_bytes
            ):
                reported[0] = copy.copied_bytes
                on_progress(copy)

        for field, source in files.items():
            name = Path(self.path_of(key, field, source)).name
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(name).delete(0)  # half written by a crash
            size = source.stat().st_size
            volume = pool.createXML(volume_xml(name, size), 0)
            stream = conn.newStream(0)
            volume.upload(stream, 0, size, 0)
            try:
                with source.open("rb") as data:
                    while chunk := data.read(CHUNK):
                        view = memoryview(chunk)
                        while view:
                            count = stream.send(view.tobytes())
                            view = view[count:]
                            sent(count)
                stream.finish()
            except BaseException:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                raise
        pool.createXML(volume_xml(f"{key}.ok", 0), 0)

    def disk(self) -> tuple[int, int]:
        """Size and free bytes of the host's image storage (its pool's filesystem)."""

        def info(conn: libvirt.virConnect) -> tuple[int, int]:
            _state, capacity, _allocation, available = self._pool(conn).info()
            return int(capacity), int(available)

        return self.call(info, f"read the storage of host {self.host}")

    def status(self) -> list[dict[str, Any]]:
        """Every image copy of this host, as ``GET /twarga/api/hosts`` shows it."""
        return [c.to_json() for c in sorted(self.copies.values(), key=lambda c: c.image)]
