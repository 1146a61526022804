"""The NoCloud seed of a cloud-init VM: the password as a hash only, password logins on, and
rsyslog pointed at the VM's virtio-serial syslog channel; the domain carries that channel."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from twarga_lab.virt.domain import SYSLOG_CHANNEL
from twarga_lab.virt.images import build_seed_iso
from twarga_lab.virt.seed import generate_password, sha512_crypt


def user_data(iso: Path) -> dict:
    text = subprocess.run(
        ["isoinfo", "-R", "-i", str(iso), "-x", "/user-data"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert text.startswith("#cloud-config\n")
    return json.loads(text.split("\n", 1)[1])


def test_the_seed_has_the_hash_not_the_password_and_forwards_the_auth_log(tmp_path):
    password = generate_password()
    iso = build_seed_iso(
        tmp_path / "seed.iso",
        instance_id="twarga-3-deb",
        hostname="deb",
        ssh_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5 alice@laptop"],
        password_hash=sha512_crypt(password),
        syslog_channel=SYSLOG_CHANNEL,
    )
    assert password.encode() not in iso.read_bytes()
    data = user_data(iso)
    (account,) = data["users"]
    assert account["name"] == "twarga" and account["lock_passwd"] is False
    assert account["passwd"].startswith("$6$")
    assert sha512_crypt(password, account["passwd"].split("$")[2]) == account["passwd"]
    assert data["ssh_pwauth"] is True
    (conf,) = data["write_files"]
    assert conf["path"].startswith("/etc/rsyslog.d/")
    assert "auth,authpriv.*" in conf["content"]
    assert f'file="/dev/virtio-ports/{SYSLOG_CHANNEL}"' in conf["content"]
    assert ["systemctl", "restart", "rsyslog"] in data["runcmd"]


def test_without_a_password_the_seed_keeps_password_logins_off(tmp_path):
    data = user_data(
        build_seed_iso(tmp_path / "seed.iso", instance_id="i", hostname="h", ssh_keys=[])
    )
    assert data["ssh_pwauth"] is False and "passwd" not in data["users"][0]
    assert "write_files" not in data
