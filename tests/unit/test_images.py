"""Images: overlays sized to the request, NoCloud seeds, registering cloud images."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import make_placeholder_image
from twarga_lab.errors import InvalidRequest, NotFound
from twarga_lab.virt.images import (
    ImageStore,
    build_seed_iso,
    create_overlay,
    qemu_img,
    virtual_size_bytes,
)


def test_overlay_is_backed_by_the_base_and_sized_in_gb(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1G")
    disk = tmp_path / "vm" / "disk.qcow2"
    create_overlay(base, disk, 12)
    info = json.loads(qemu_img("info", "--output=json", str(disk)))
    assert info["virtual-size"] == 12 * 2**30 == virtual_size_bytes(disk)
    assert info["backing-filename"] == str(base)
    assert info["format"] == "qcow2"
    assert disk.stat().st_size < 2**20  # sparse: nothing written yet


def test_seed_iso_carries_the_users_key(tmp_path):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5 alice@laptop"
    iso = build_seed_iso(
        tmp_path / "seed.iso", instance_id="twarga-1-web", hostname="web", ssh_keys=[key]
    )
    label = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True)
    assert "Volume id: cidata" in label.stdout
    user_data = subprocess.run(
        ["isoinfo", "-R", "-i", str(iso), "-x", "/user-data"], capture_output=True, text=True
    ).stdout
    assert user_data.startswith("#cloud-config\n")
    assert json.loads(user_data.split("\n", 1)[1])["users"][0]["ssh_authorized_keys"] == [key]


def test_store_lists_only_complete_images(tmp_path):
    store = ImageStore(tmp_path)
    make_placeholder_image(tmp_path)
    broken = make_placeholder_image(tmp_path, "broken/one")
    (broken / "vmlinuz").unlink()
    assert [i.name for i in store.list()] == ["twarga/tiny"]
    with pytest.raises(NotFound):
        store.get("broken/one")
    with pytest.raises(NotFound):
        store.get("../etc")


def test_add_a_cloud_image_from_a_local_qcow2(tmp_path):
    source = tmp_path / "debian.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(source), "3G")
    store = ImageStore(tmp_path / "images")
    image = store.add_disk_image("debian/12", source, os_type="debian")
    assert (image.kind, image.cloud_init, image.min_disk_gb) == ("disk", True, 3)
    assert store.get("debian/12").os_type == "debian"
    raw = tmp_path / "raw.img"
    qemu_img("create", "-q", "-f", "raw", str(raw), "1G")
    with pytest.raises(InvalidRequest, match="not qcow2"):
        store.add_disk_image("raw/one", raw)
    with pytest.raises(InvalidRequest):
        store.add_disk_image("Bad Name", source)
