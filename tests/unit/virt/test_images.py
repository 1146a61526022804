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


def write_meta(folder, **overrides):
    meta = json.loads((folder / "image.json").read_text())
    meta.update(overrides)
    (folder / "image.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "overrides",
    [
        {"base_disk": "../../etc/passwd"},
        {"base_disk": "/etc/passwd"},
        {"kernel": "../../../boot/vmlinuz"},
        {"initrd": "/etc/shadow"},
        {"base_disk": "sub/../../tiny/base.qcow2"},
    ],
)
def test_an_image_naming_a_file_outside_its_folder_is_refused(tmp_path, overrides):
    store = ImageStore(tmp_path / "images")
    make_placeholder_image(store.root)
    evil = make_placeholder_image(store.root, "evil/one")
    write_meta(evil, **overrides)
    assert [i.name for i in store.list()] == ["twarga/tiny"]
    with pytest.raises(NotFound):
        store.get("evil/one")


def test_a_link_out_of_the_image_folder_is_refused(tmp_path):
    store = ImageStore(tmp_path / "images")
    evil = make_placeholder_image(store.root, "evil/link")
    (evil / "vmlinuz").unlink()
    (evil / "vmlinuz").symlink_to("/etc/passwd")
    with pytest.raises(NotFound):
        store.get("evil/link")


def test_a_base_disk_backed_by_a_host_file_is_refused(tmp_path):
    secret = tmp_path / "secret.qcow2"  # stands for any host file QEMU could be made to read
    qemu_img("create", "-q", "-f", "qcow2", str(secret), "1G")
    store = ImageStore(tmp_path / "images")
    evil = make_placeholder_image(store.root, "evil/backed")
    (evil / "base.qcow2").unlink()
    qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(secret), str(evil / "base.qcow2")
    )
    with pytest.raises(NotFound):
        store.get("evil/backed")
    # A backing file inside the image's own folder is fine.
    fine = make_placeholder_image(store.root, "fine/backed")
    qemu_img("create", "-q", "-f", "qcow2", str(fine / "root.qcow2"), "1G")
    (fine / "base.qcow2").unlink()
    qemu_img(
        "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "root.qcow2", str(fine / "base.qcow2")
    )
    assert store.get("fine/backed").base_disk == fine / "base.qcow2"
    # And registering a qcow2 with a backing file is refused outright.
    with pytest.raises(InvalidRequest, match="backing file"):
        store.add_disk_image("evil/added", evil / "base.qcow2")


def test_an_interrupted_overlay_leaves_no_disk_behind(tmp_path):
    from twarga_lab.errors import BackendError

    disk = tmp_path / "vm" / "disk.qcow2"
    with pytest.raises(BackendError):
        create_overlay(tmp_path / "missing-base.qcow2", disk, 10)
    assert list(disk.parent.iterdir()) == []
