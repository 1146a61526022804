"""twarga_lab.services.vms.quota: names, sizes, the image a body names, per-user quotas
and the credit check, with the reasons the API returns for each refusal."""

from __future__ import annotations

import pytest

from tests.unit.services.vms_support import ALICE, BOB, world
from twarga_lab.db.models import VM, Quota, VMStatus
from twarga_lab.errors import Conflict, QuotaExceeded, ValidationFailed
from twarga_lab.schemas.vms import CreateVM, UpdateVM
from twarga_lab.services.vms import VMBounds, requested_image, validate_name
from twarga_lab.services.vms.quota import (
    CreateRequest,
    check_create_quota,
    check_ram_change,
    require_credits,
    validate_create,
    validate_update,
)


@pytest.fixture
def w(tmp_path):
    with world(tmp_path) as w:
        yield w


def refusal(excinfo: pytest.ExceptionInfo) -> tuple[str, str | None]:
    return excinfo.value.reason, getattr(excinfo.value, "field", None)


@pytest.mark.parametrize("name", ["web", "a", "web-1", "a" + "b" * 62])
def test_good_names_pass(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Web", "1web", "-web", "web_1", "a" * 64, "wéb"])
def test_bad_names_are_invalid_name(name):
    with pytest.raises(ValidationFailed) as e:
        validate_name(name)
    assert e.value.reason == "invalid_name"
    assert "lowercase letter" in e.value.message


def test_image_and_its_alias_os_type():
    assert requested_image({"image": "twarga/tiny"}) == "twarga/tiny"
    assert requested_image({"os_type": "twarga/tiny"}) == "twarga/tiny"
    assert requested_image({"image": "x/y", "os_type": "x/y"}) == "x/y"
    assert requested_image({}) is None
    with pytest.raises(ValidationFailed) as e:
        requested_image({"image": "a/b", "os_type": "c/d"})
    assert e.value.reason == "conflicting_fields"


def test_a_create_body_gets_the_smallest_sizes_and_the_default_image(w):
    request = validate_create(
        CreateVM.from_body({"name": "web"}), VMBounds(), w.images, "twarga/tiny"
    )
    assert request == CreateRequest(name="web", image="twarga/tiny", ram=512, cpu=1, disk=10)


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        ({"ram": 8192}, "ram", "ram must be between 512 and 4096 MB, not 8192"),
        ({"ram": 256}, "ram", "ram must be between 512 and 4096 MB, not 256"),
        ({"cpu": 5}, "cpu", "cpu must be between 1 and 4 vCPUs, not 5"),
        ({"cpu": 0}, "cpu", "cpu must be between 1 and 4 vCPUs, not 0"),
        ({"disk": 101}, "disk", "disk must be between 10 and 100 GB, not 101"),
        ({"disk": 9}, "disk", "disk must be between 10 and 100 GB, not 9"),
    ],
)
def test_sizes_outside_the_bounds_are_out_of_range(w, body, field, text):
    with pytest.raises(ValidationFailed) as e:
        validate_create(
            CreateVM.from_body({"name": "web", **body}), VMBounds(), w.images, "twarga/tiny"
        )
    assert refusal(e) == ("out_of_range", field)
    assert e.value.message == text


def test_the_bounds_are_the_settings(w):
    bounds = VMBounds(min_ram_mb=1024, max_ram_mb=2048)
    with pytest.raises(ValidationFailed) as e:
        validate_create(
            CreateVM.from_body({"name": "web", "ram": 4096}), bounds, w.images, "twarga/tiny"
        )
    assert e.value.message == "ram must be between 1024 and 2048 MB, not 4096"
    assert (
        validate_create(CreateVM.from_body({"name": "web"}), bounds, w.images, "twarga/tiny").ram
        == 1024
    )


def test_an_unknown_image_names_the_field_it_came_from(w):
    for key in ("image", "os_type"):
        with pytest.raises(ValidationFailed) as e:
            validate_create(
                CreateVM.from_body({"name": "web", key: "no/such"}),
                VMBounds(),
                w.images,
                "twarga/tiny",
            )
        assert refusal(e) == ("unknown_image", key)


def test_an_update_is_checked_like_a_create():
    validate_update(UpdateVM.from_body({"name": "db", "ram": 1024, "cpu": 2}), VMBounds())
    validate_update(UpdateVM.from_body({"name": "db"}), VMBounds())  # sizes not sent
    with pytest.raises(ValidationFailed) as e:
        validate_update(UpdateVM.from_body({"cpu": 9}), VMBounds())
    assert refusal(e) == ("out_of_range", "cpu")
    assert e.value.message == "cpu must be between 1 and 4 vCPUs, not 9"
    with pytest.raises(ValidationFailed) as e:
        validate_update(UpdateVM.from_body({"ram": 100}), VMBounds())
    assert refusal(e) == ("out_of_range", "ram")


def add_vm(w, owner: str, name: str, status=VMStatus.stopped, ram=512, cpu=1, disk=10) -> int:
    owner_id = w.users.ensure(owner)
    with w.db.session() as session:
        vm = VM(owner_id=owner_id, name=name, image="twarga/tiny", os_type="linux",
                ram_mb=ram, cpu=cpu, disk_gb=disk, status=status)  # fmt: skip
        session.add(vm)
        session.flush()
        return vm.id


def set_quota(w, owner: str, **limits) -> int:
    owner_id = w.users.ensure(owner)
    with w.db.session() as session:
        session.add(Quota(user_id=owner_id, **limits))
    return owner_id


def check(w, owner: str, name="new", ram=512, cpu=1, disk=10) -> None:
    owner_id = w.users.ensure(owner)
    with w.db.session() as session:
        check_create_quota(
            session, w.users, owner_id, CreateRequest(name, "twarga/tiny", ram, cpu, disk)
        )


def test_one_vm_more_than_the_quota_is_refused(w):
    set_quota(w, "alice", max_vms=2)
    add_vm(w, "alice", "one")
    check(w, "alice")  # the second is fine
    add_vm(w, "alice", "two")
    with pytest.raises(QuotaExceeded) as e:
        check(w, "alice")
    assert e.value.reason == "quota_exceeded"
    assert e.value.message == "you may have at most 2 VMs and have 2"
    check(w, "bob")  # quotas are per user


def test_destroyed_vms_hold_nothing(w):
    set_quota(w, "alice", max_vms=1, max_ram_mb=1024)
    add_vm(w, "alice", "new", status=VMStatus.destroyed, ram=1024)
    check(w, "alice", name="new", ram=1024)  # neither the count, nor the RAM, nor the name


def test_ram_cpu_and_disk_quotas(w):
    set_quota(w, "alice", max_ram_mb=2048, max_cpu=3, max_disk_gb=30)
    add_vm(w, "alice", "one", ram=1536, cpu=2, disk=20)
    with pytest.raises(QuotaExceeded) as e:
        check(w, "alice", ram=1024)
    assert e.value.message == (
        "1024 MB more RAM would exceed your quota of 2048 MB (1536 MB in use)"
    )
    with pytest.raises(QuotaExceeded) as e:
        check(w, "alice", cpu=2)
    assert e.value.message == "2 more vCPUs would exceed your quota of 3"
    with pytest.raises(QuotaExceeded) as e:
        check(w, "alice", disk=11)
    assert e.value.message == "11 GB more disk would exceed your quota of 30 GB"
    check(w, "alice", ram=512, cpu=1, disk=10)  # exactly at every limit


def test_a_name_in_use_is_taken_and_no_credits_come_before_quotas(w):
    add_vm(w, "alice", "web")
    with pytest.raises(Conflict) as e:
        check(w, "alice", name="web")
    assert e.value.reason == "name_taken"
    check(w, "bob", name="web")
    w.set_balance("alice", 0)
    set_quota(w, "alice", max_vms=0)
    with pytest.raises(QuotaExceeded) as e:
        check(w, "alice")
    assert e.value.reason == "no_credits"


def test_a_resize_counts_the_vm_once(w):
    set_quota(w, "alice", max_ram_mb=2048)
    vm_id = add_vm(w, "alice", "one", ram=1024)
    add_vm(w, "alice", "two", ram=512)
    with w.db.session() as session:
        vm = session.get(VM, vm_id)
        check_ram_change(session, w.users, vm, 1536)  # 1536 + 512 = 2048
        with pytest.raises(QuotaExceeded) as e:
            check_ram_change(session, w.users, vm, 2048)
    assert e.value.message == "2048 MB would exceed the RAM quota of 2048 MB"


def test_no_credits_refuses_a_start_and_says_so_in_an_event(w):
    vm_id = add_vm(w, "alice", "web")
    require_credits(w.db, ALICE, vm_id, "start")  # starting credits: fine
    w.set_balance("alice", 0)
    with pytest.raises(QuotaExceeded) as e:
        require_credits(w.db, BOB, vm_id, "start")
    assert e.value.reason == "no_credits"
    assert "alice has no credits left" in e.value.message
    (event,) = w.events(vm_id, action="start")
    assert event.severity == "warning"
    assert event.message == "start of VM web refused for bob: alice has no credits"
    assert event.details["reason"] == "no_credits"


async def test_a_refused_create_is_a_warning_event_and_no_vm(w):
    set_quota(w, "alice", max_vms=0)
    with pytest.raises(QuotaExceeded):
        await w.create(ALICE, name="web")
    assert await w.vms.list(ALICE) == []
    (event,) = w.events(action="create")
    assert event.severity == "warning"
    assert event.message.startswith("VM web refused for alice: you may have at most 0 VMs")
    assert event.details["reason"] == "quota_exceeded"
