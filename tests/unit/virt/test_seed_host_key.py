"""The guest's SSH host key is made on the host, carried by the seed, and its fingerprint
is the one OpenSSH shows."""

from __future__ import annotations

import subprocess

from twarga_lab.virt.seed import HOST_KEY_FILE, build_tiny_seed, generate_host_key, key_fingerprint


def test_host_key_rides_on_the_seed_and_its_fingerprint_is_opensshs(tmp_path):
    private = tmp_path / "key"
    public = generate_host_key(private)
    assert public.startswith("ssh-ed25519 ") and len(public.split()) == 2
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    shown = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", "-"],
        input=public + "\n", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert key_fingerprint(public) == shown.stdout.split()[1]
    seed = build_tiny_seed(
        tmp_path / "seed.iso", authorized_keys=[], root_password_hash=None, host_key=private
    )
    carried = subprocess.run(
        ["isoinfo", "-R", "-i", str(seed), "-x", f"/{HOST_KEY_FILE}"], capture_output=True,
        check=True,
    ).stdout  # fmt: skip
    assert carried == private.read_bytes()
    assert generate_host_key(private) != public  # a new key each time it is made
