"""twarga_lab.services.vms.provisioning: a new VM's row (SSH port, password, domain
name), its files (overlay disk, tiny seed, host key, private rights) and its domain."""

from __future__ import annotations

import socket
import stat

import pytest

from tests.unit.services.vms_support import ALICE, world
from twarga_lab.db.models import VM, VMStatus
from twarga_lab.errors import QuotaExceeded
from twarga_lab.services.vms import GUEST_IP, HOST_KEY_PUB, TINY_SEED, port_is_free
from twarga_lab.services.vms.quota import CreateRequest
from twarga_lab.virt.domain import SYSLOG_CHANNEL
from twarga_lab.virt.images import virtual_size_bytes


@pytest.fixture
def w(tmp_path):
    with world(tmp_path) as w:
        yield w


def new_vm(w, name: str, owner: str = "alice", disk: int = 10) -> VM:
    user_id = w.users.ensure(owner)
    image = w.images.get("twarga/tiny")
    with w.db.session() as session:
        vm = w.vms.provisioner.new_vm(
            session, user_id, CreateRequest(name, "twarga/tiny", 512, 1, disk), image
        )
        session.flush()
        session.expunge(vm)
    return vm


def listen(port: int) -> socket.socket:
    """Another program on 127.0.0.1:``port``."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_a_new_vm_is_pending_with_the_first_port_a_password_and_its_domain_name(w):
    vm = new_vm(w, "web")
    assert vm.status is VMStatus.pending
    assert vm.ssh_port == w.vms.ssh_port_min
    assert vm.ip_address == GUEST_IP
    assert vm.root_password and len(vm.root_password) >= 12
    assert vm.domain_name == f"{w.prefix}{vm.id}-web"
    assert new_vm(w, "db").root_password != vm.root_password


def test_ports_of_live_vms_and_ports_other_programs_hold_are_skipped(w):
    low = w.vms.ssh_port_min
    assert new_vm(w, "a").ssh_port == low
    assert new_vm(w, "b").ssh_port == low + 1
    with listen(low + 2):
        assert not port_is_free(low + 2)
        assert new_vm(w, "c").ssh_port == low + 3
    assert port_is_free(low + 2)
    with w.db.session() as session:
        session.get(VM, new_vm(w, "d").id).status = VMStatus.destroyed  # took low + 2
    assert new_vm(w, "e").ssh_port == low + 2  # a destroyed VM's port is free again


async def test_an_exhausted_port_range_refuses_with_no_ports(tmp_path):
    with world(tmp_path, ports=1) as w:
        new_vm(w, "one")
        with pytest.raises(QuotaExceeded) as e:
            new_vm(w, "two")
        assert (e.value.reason, e.value.message) == ("no_ports", "no SSH port is free on this host")
        # Through the service it is the same refusal, recorded, and no VM.
        with pytest.raises(QuotaExceeded) as e:
            await w.create(ALICE, name="three")
        assert e.value.reason == "no_ports"
        assert [vm["name"] for vm in await w.vms.list(ALICE)] == ["one"]
        assert w.events(action="create")[-1].details["reason"] == "no_ports"


def test_a_squatted_port_moves_to_a_free_one_and_is_a_security_event(w):
    vm = new_vm(w, "web")
    assert w.vms.provisioner.claim_ssh_port(vm.id) is None  # nobody on it: it stays
    with listen(vm.ssh_port):
        notice = w.vms.provisioner.claim_ssh_port(vm.id)
    moved = w.row(vm.id).ssh_port
    assert moved != vm.ssh_port
    assert notice == (
        f"SSH moved from port {vm.ssh_port} (another program was listening there) to {moved}; "
        "connect to the new port and check the VM's host key"
    )
    (event,) = w.events(vm.id, action="ssh_port_moved")
    assert event.type == "security" and event.severity == "warning"
    assert (event.details["previous_port"], event.details["port"]) == (vm.ssh_port, moved)


def test_the_domain_of_a_kernel_image_vm(w):
    vm = new_vm(w, "web")
    spec = w.vms.provisioner.domain_spec(vm, "alice")
    folder = w.vms.instance_dir(vm.domain_name)
    assert folder == w.vms.settings.vms_dir / "instances" / vm.domain_name
    assert (spec.name, spec.memory_mib, spec.vcpus) == (vm.domain_name, 512, 1)
    assert (spec.owner, spec.vm_id) == ("alice", vm.id)
    assert [(d.target, d.path.name, d.readonly) for d in spec.disks] == [
        ("vda", "disk.qcow2", False),
        ("vdb", TINY_SEED, True),
    ]
    assert ("twarga.name", "web") in spec.cmdline
    assert not any("password" in key or "key" in key for key, _ in spec.cmdline)
    assert spec.kernel == w.image_dir / "vmlinuz"
    assert spec.network.ssh_host_port == vm.ssh_port
    assert [c.name for c in spec.channels] == [SYSLOG_CHANNEL]
    assert spec.console_log == folder / "console.log"


def test_prepare_disks_makes_a_private_overlay_seed_and_host_key(w):
    vm = new_vm(w, "web", disk=12)
    folder = w.vms.instance_dir(vm.domain_name)
    folder.mkdir(parents=True)
    (folder / ".disk.qcow2.tmp").write_bytes(b"half a write")
    spec = w.vms.provisioner.prepare_disks(vm.id)
    assert spec.name == vm.domain_name
    assert virtual_size_bytes(folder / "disk.qcow2") == 12 * 1024**3
    assert (folder / TINY_SEED).stat().st_size > 0
    assert not (folder / ".disk.qcow2.tmp").exists()
    key = w.vms.host_key(vm.domain_name)
    assert key is not None and key.startswith("ssh-ed25519 ")
    assert (folder / HOST_KEY_PUB).read_text().strip() == key
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "disk.qcow2").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o711
    # Again (a start after an error): what exists is kept, the host key too.
    w.vms.provisioner.prepare_disks(vm.id)
    assert w.vms.host_key(vm.domain_name) == key


def test_no_host_key_file_is_none_and_remove_files_removes_the_folder(w):
    vm = new_vm(w, "web")
    assert w.vms.host_key(vm.domain_name) is None
    w.vms.provisioner.prepare_disks(vm.id)
    w.vms.provisioner.remove_files(vm.domain_name)
    assert not w.vms.instance_dir(vm.domain_name).exists()
    w.vms.provisioner.remove_files(vm.domain_name)  # nothing there: fine
