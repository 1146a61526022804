"""The notebook client's labs and deployments (``Lab.create_lab``, ``LabInstance``,
``Deployment``) against a fake of the labs API on 127.0.0.1 (``tests/unit/labs_fake.py``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.unit.labs_fake import ATTACK_DEFEND, FakeTwarga
from twarga_lab.client import (
    CHECK_COLUMNS,
    VM,
    Deployment,
    Lab,
    LabInstance,
    NotFound,
    PermissionDenied,
)

THREE_TINY = {
    "schema": "twarga-lab-template/v1",
    "name": "three-tiny",
    "networks": [{"name": "lan", "cidr": "10.78.0.0/24"}],
    "machines": [
        {"name": "node", "image": "twarga/tiny", "count": 3, "networks": [{"network": "lan"}]}
    ],
    "checks": [{"name": "up", "machine": "node-1", "run": "true"}],
}


@pytest.fixture
def fake() -> Iterator[FakeTwarga]:
    with FakeTwarga(boot_seconds=0.3) as server:
        yield server


@pytest.fixture
def connect(fake: FakeTwarga) -> Iterator:
    made: list[Lab] = []

    def make(user: str) -> Lab:
        lab = Lab(fake.url, fake.token(user), timeout=10)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab._http.close()


def test_lab_templates_lists_the_templates_with_their_sizes(connect):
    templates = connect("alice").lab_templates()
    assert [t["name"] for t in templates] == ["attack-defend"]
    assert templates[0]["vm_count"] == 2 and templates[0]["machines"][0]["name"] == "attacker"


def test_create_lab_by_name_waits_until_every_vm_runs(connect):
    lab = connect("alice")
    mine = lab.create_lab("attack-defend", "mine")
    assert isinstance(mine, LabInstance)
    assert (mine.name, mine.owner, mine.status) == ("mine", "alice", "pending")
    assert "mine" in repr(mine) and "pending" in repr(mine)
    t0 = time.monotonic()
    assert mine.wait("running", timeout=10, poll=0.05) is mine
    assert time.monotonic() - t0 < 5
    assert mine.status == "running"
    vms = mine.vms
    assert all(isinstance(vm, VM) for vm in vms)
    assert [(vm.name, vm.machine, vm.status) for vm in vms] == [
        ("mine-attacker", "attacker", "running"),
        ("mine-target", "target", "running"),
    ]
    assert vms[1].addresses == {"lan": "10.77.0.12"}
    assert mine.networks == [{"name": "lan", "cidr": "10.77.0.0/24"}]


def test_create_lab_from_a_dict_template_and_list_labs(connect, fake):
    alice, bob, teacher = connect("alice"), connect("bob"), connect("teacher")
    made = alice.create_lab(THREE_TINY, "nodes", wait=True, timeout=10)
    assert made.status == "running" and len(made.vms) == 3
    assert fake.labs[made.id]["template"] == "three-tiny"
    bob.create_lab("attack-defend", "bobs")
    assert [x.name for x in alice.labs()] == ["nodes"]
    assert [x.name for x in alice.labs(all=True)] == ["nodes"]  # not an admin: own only
    assert sorted(x.owner for x in teacher.labs(all=True)) == ["alice", "bob"]
    assert teacher.labs() == []
    again = alice.get_lab(made.id)
    assert again.id == made.id and again.to_dict()["vms"][0]["lab_id"] == made.id


def test_someone_elses_or_an_unknown_lab_is_not_found(connect):
    alice, bob = connect("alice"), connect("bob")
    mine = alice.create_lab("attack-defend", "mine")
    with pytest.raises(NotFound):
        bob.get_lab(mine.id)
    with pytest.raises(NotFound):
        alice.get_lab(9999)
    with pytest.raises(NotFound) as e:
        alice.create_lab("no-such-template", "x")
    assert "no-such-template" in e.value.message


def test_stop_start_destroy_act_on_the_whole_lab(connect, fake):
    lab = connect("alice")
    mine = lab.create_lab("attack-defend", "mine").wait("running", timeout=10, poll=0.05)
    assert mine.stop().status == "stopped"
    assert {vm.status for vm in mine.vms} == {"stopped"}
    assert mine.start().status == "pending"
    mine.wait("running", timeout=10, poll=0.05)
    assert mine.destroy().status == "destroyed"
    assert ("alice", "POST", f"labs/{mine.id}/action") in fake.requests
    with pytest.raises(NotFound):
        lab.get_lab(mine.id)
    assert lab.labs() == []


def test_wait_gives_up_at_its_deadline(connect, fake):
    fake.boot_seconds = 60
    mine = connect("alice").create_lab("attack-defend", "slow")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="slow is pending, not running"):
        mine.wait("running", timeout=0.5, poll=0.1)
    assert 0.5 <= time.monotonic() - t0 < 3


def test_check_is_a_dataframe_with_one_row_per_check(connect, fake):
    mine = connect("alice").create_lab("attack-defend", "mine").wait("running", 10, 0.05)
    fake.solved["alice"] = {"attacker reaches target"}
    frame = mine.check()
    assert list(frame.columns)[: len(CHECK_COLUMNS)] == CHECK_COLUMNS
    assert frame["check"].tolist() == ["attacker reaches target", "target is hardened"]
    assert frame["machine"].tolist() == ["attacker", "target"]
    assert frame["passed"].tolist() == [True, False]
    assert frame["score"].tolist() == [1.0, 0.0] and frame["points"].tolist() == [1.0, 2.0]
    assert frame["exit_code"].tolist() == [0, 1]
    assert "1 packets received" in frame["output"][0]
    assert (frame.attrs["score"], frame.attrs["max_score"]) == (1.0, 3.0)


def test_deploy_gives_every_student_a_lab_and_grades_them(connect, fake):
    teacher = connect("teacher")
    course = teacher.deploy("attack-defend", "sec101", "tp1")
    assert isinstance(course, Deployment)
    assert sorted(x.owner for x in course.labs) == ["alice", "bob", "carol"]
    assert all(x.deployment_id == course.id for x in course.labs)
    course.wait("running", timeout=10, poll=0.05)
    fake.solved["alice"] = {"attacker reaches target", "target is hardened"}
    fake.solved["bob"] = {"target is hardened"}
    checks = course.check()
    assert len(checks) == 3 * 2
    assert list(checks.columns)[:2] == ["student", "lab_id"]
    assert checks.groupby("student")["score"].sum().to_dict() == {
        "alice": 3.0,
        "bob": 2.0,
        "carol": 0.0,
    }
    grades = course.grades()
    assert list(grades.columns) == ["student", "lab_id", "score", "max_score", "grade"]
    assert grades["student"].tolist() == ["alice", "bob", "carol"]
    assert grades["grade"].tolist() == [100.0, 66.7, 0.0]
    assert grades["max_score"].tolist() == [3.0, 3.0, 3.0]
    assert set(grades["lab_id"]) == {x.id for x in course.labs}
    # Each student sees their own copy only.
    alice = connect("alice")
    assert [(x.name, x.deployment_id) for x in alice.labs()] == [("tp1", course.id)]


def test_deployments_are_listed_and_read_back_by_the_teacher(connect):
    teacher = connect("teacher")
    course = teacher.deploy(ATTACK_DEFEND, "sec101", "tp1")
    assert [d.id for d in teacher.deployments()] == [course.id]
    again = teacher.get_deployment(course.id)
    assert (again.name, again.group, len(again.labs)) == ("tp1", "sec101", 3)
    grades = again.grades()  # runs the checks when none ran yet
    assert len(grades) == 3 and grades["grade"].tolist() == [0.0, 0.0, 0.0]


def test_a_student_cannot_deploy_nor_see_deployments(connect):
    teacher, alice = connect("teacher"), connect("alice")
    course = teacher.deploy("attack-defend", "sec101", "tp1")
    with pytest.raises(PermissionDenied):
        alice.deploy("attack-defend", "sec101", "tp2")
    assert alice.deployments() == []
    with pytest.raises(NotFound):
        alice.get_deployment(course.id)
