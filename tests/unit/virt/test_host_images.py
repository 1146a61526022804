"""Copies of images on a host with storage of its own (``virt.host_images``), against a
fake of libvirt's storage API: the pool made on first use, every file uploaded in chunks
with progress, a marker written last, a second use copying nothing, an interrupted copy
made again from scratch, a rebuilt image copied afresh. The same through a real libvirtd:
``tests/real/test_hosts_real.py`` and ``bench/host_images.py``."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from twarga_lab.errors import BackendError
from twarga_lab.virt.host_images import CHUNK, HostImageCache, ImageCopy, copy_key
from twarga_lab.virt.images import Image


class FakeStream:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn
        self.target: FakeVolume | None = None
        self.finished = self.aborted = False

    def send(self, data: bytes) -> int:
        if self.conn.fail_after is not None and self.conn.sent >= self.conn.fail_after:
            raise libvirt.libvirtError("stream broke")
        count = min(len(data), 300_000)  # libvirt may take less than it was given
        assert self.target is not None
        self.target.data += data[:count]
        self.conn.sent += count
        return count

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        self.aborted = True


class FakeVolume:
    def __init__(self, pool: FakePool, name: str, capacity: int) -> None:
        self.pool, self.name, self.capacity, self.data = pool, name, capacity, b""

    def upload(self, stream: FakeStream, offset: int, length: int, flags: int) -> None:
        assert (offset, length, flags) == (0, self.capacity, 0)
        stream.target = self

    def delete(self, flags: int) -> None:
        del self.pool.volumes[self.name]


class FakePool:
    def __init__(self, xml: str) -> None:
        self.path = ET.fromstring(xml).findtext("target/path")
        self.active = self.built = self.refreshed = self.autostart = False
        self.volumes: dict[str, FakeVolume] = {}

    def build(self, flags: int) -> None:
        self.built = True

    def isActive(self) -> bool:
        return self.active

    def create(self, flags: int) -> None:
        self.active = True

    def refresh(self, flags: int) -> None:
        self.refreshed = True  # a real pool rescans its folder here

    def setAutostart(self, on: int) -> None:
        self.autostart = bool(on)

    def storageVolLookupByName(self, name: str) -> FakeVolume:
        if name not in self.volumes:
            raise libvirt.libvirtError(f"no volume {name}")
        return self.volumes[name]

    def createXML(self, xml: str, flags: int) -> FakeVolume:
        element = ET.fromstring(xml)
        name = element.findtext("name") or ""
        assert element.find("capacity").get("unit") == "bytes"  # type: ignore[union-attr]
        volume = FakeVolume(self, name, int(element.findtext("capacity") or 0))
        self.volumes[name] = volume
        return volume

    def info(self) -> list[int]:
        return [2, 100 * 2**30, 10 * 2**30, 90 * 2**30]


class FakeConn:
    def __init__(self) -> None:
        self.pools: dict[str, FakePool] = {}
        self.sent = 0
        self.fail_after: int | None = None

    def storagePoolLookupByName(self, name: str) -> FakePool:
        if name not in self.pools:
            raise libvirt.libvirtError(f"no pool {name}")
        return self.pools[name]

    def storagePoolDefineXML(self, xml: str, flags: int) -> FakePool:
        pool = self.pools[ET.fromstring(xml).findtext("name") or ""] = FakePool(xml)
        return pool

    def newStream(self, flags: int) -> FakeStream:
        return FakeStream(self)


@pytest.fixture
def image(tmp_path: Path) -> Image:
    for name, size in (("base.qcow2", 3 * CHUNK + 17), ("vmlinuz", 5 * CHUNK), ("initrd.img", 99)):
        (tmp_path / name).write_bytes(os.urandom(size))
    return Image(
        name="twarga/tiny", kind="kernel", os_type="linux", description="tiny",
        base_disk=tmp_path / "base.qcow2", kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
    )  # fmt: skip


@pytest.fixture
def conn() -> FakeConn:
    return FakeConn()


@pytest.fixture
def cache(conn: FakeConn) -> HostImageCache:
    def call(fn: Any, _action: str) -> Any:
        return fn(conn)

    return HostImageCache("h2", call, "/srv/twarga/images/")


def test_the_first_use_copies_every_file_with_progress_then_a_marker(cache, conn, image):
    heard: list[tuple[str, int]] = []
    on_host = cache.ensure(image, lambda copy: heard.append((copy.state, copy.copied_bytes)))
    pool = conn.pools["twarga-images"]
    assert pool.path == "/srv/twarga/images" and pool.built and pool.active
    assert pool.autostart and pool.refreshed  # there again after the host reboots
    key = copy_key(image)
    for field in ("base_disk", "kernel", "initrd"):
        local = getattr(image, field)
        remote = getattr(on_host, field)
        assert str(remote) == f"/srv/twarga/images/{key}-{field}{local.suffix}"
        assert pool.volumes[remote.name].data == local.read_bytes()  # every byte, in order
    assert f"{key}.ok" in pool.volumes
    total = 8 * CHUNK + 17 + 99
    # Progress every 4 MB and at the end, always growing; then "ready".
    copied = [n for state, n in heard if state == "copying"]
    assert copied == sorted(copied) and len(copied) >= 2 and copied[-1] == total
    assert heard[-1] == ("ready", total)
    [status] = cache.status()
    assert status["state"] == "ready" and status["percent"] == 100.0
    assert status["bytes"] == status["total_bytes"] == total


def test_a_second_use_copies_nothing(cache, conn, image):
    cache.ensure(image, lambda _copy: None)
    sent = conn.sent
    heard: list[ImageCopy] = []
    again = cache.ensure(image, heard.append)
    assert conn.sent == sent and heard == []
    assert again.kernel is not None and again.kernel.name.startswith(copy_key(image))


def test_an_interrupted_copy_is_made_again_from_scratch(cache, conn, image):
    conn.fail_after = 4 * CHUNK
    heard: list[str] = []
    with pytest.raises(BackendError, match="could not copy image twarga/tiny to host h2"):
        cache.ensure(image, lambda copy: heard.append(copy.state))
    assert heard[-1] == "failed" and cache.status()[0]["state"] == "failed"
    pool = conn.pools["twarga-images"]
    assert f"{copy_key(image)}.ok" not in pool.volumes  # never taken for a whole copy
    conn.fail_after = None
    on_host = cache.ensure(image, lambda _copy: None)
    assert on_host.base_disk.name in pool.volumes
    assert pool.volumes[on_host.base_disk.name].data == image.base_disk.read_bytes()
    assert pool.volumes[on_host.kernel.name].data == image.kernel.read_bytes()  # type: ignore[union-attr]


def test_a_rebuilt_image_is_copied_afresh(cache, conn, image):
    first = cache.ensure(image, lambda _copy: None)
    image.kernel.write_bytes(os.urandom(CHUNK))  # type: ignore[union-attr]
    second = cache.ensure(image, lambda _copy: None)
    assert second.kernel != first.kernel
    assert conn.pools["twarga-images"].volumes[second.kernel.name].data == image.kernel.read_bytes()  # type: ignore[union-attr]
    assert cache.disk() == (100 * 2**30, 90 * 2**30)
