"""A class through a real JupyterHub: an instructor (a member of the Hub's ``instructors``
group, which has the ``instructor`` role) deploys a lab template to every member of a Hub
group in one call; each student owns their copy and sees only it; the instructor sees
all copies, grades them, and may not deploy to a group they do not teach."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_placeholder_image
from tests.hub.conftest import ADMIN_PASSWORD, HubClient, HubProcess, api, prepare_hub, unique_name

pytestmark = pytest.mark.hub
PASSWORD = "Correct-Horse-7-Battery"


@pytest.fixture(scope="module")
def hub() -> Iterator[HubProcess]:
    root = Path("/tmp") / f"twarga-hub-{uuid.uuid4().hex[:8]}"
    images = root.parent / f"{root.name}-images"
    make_placeholder_image(images)
    env = prepare_hub(
        root, images, "test:///default", f"tc{uuid.uuid4().hex[:6]}-",
        "--TwargaLabApp.min_ram_mb=64", "--TwargaLabApp.min_disk_gb=1",
    )  # fmt: skip
    process = HubProcess(env, root)
    process.start()
    yield process
    process.stop()
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(images, ignore_errors=True)


@pytest.fixture(scope="module")
def people(hub) -> Iterator[dict[str, str]]:
    """A teacher, three students and an outsider, signed up and approved: name -> token."""
    admin = HubClient(hub)
    assert admin.login("admin", ADMIN_PASSWORD).status_code == 302
    tokens = {"admin": admin.token("admin")}
    names = []
    for i, role in enumerate(["teacher", "s1", "s2", "s3", "outsider"]):
        name = unique_name(role[:2])
        names.append(name)
        client = HubClient(hub, f"127.0.3.{i + 1}")  # sign-ups are limited per address
        assert client.sign_up(name, PASSWORD).status_code == 200
        admin.form("/hub/twarga-accounts", {"action": "approve", "name": name})
        assert client.login(name, PASSWORD).status_code == 302
        tokens[role] = client.token(name)
        tokens[f"{role}-name"] = name
    yield tokens
    for name in names:
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        subprocess.run(["groupdel", name], capture_output=True)


def hub_api(hub, token, method, path, body=None):
    return httpx.request(
        method, f"{hub.url}/hub/api/{path}", headers={"Authorization": f"token {token}"},
        json=body, timeout=30,
    )  # fmt: skip


def test_an_instructor_deploys_to_a_group_and_grades_every_copy(hub, people):
    admin = people["admin"]
    teacher = people["teacher-name"]
    students = sorted(people[f"s{i}-name"] for i in (1, 2, 3))
    group = f"class-{uuid.uuid4().hex[:6]}"
    assert hub_api(hub, admin, "POST", f"groups/{group}").status_code == 201
    members = {"users": [teacher, *students]}
    assert hub_api(hub, admin, "POST", f"groups/{group}/users", members).status_code == 200
    assert hub_api(hub, admin, "POST", "groups/instructors/users",
                   {"users": [teacher]}).status_code == 200  # fmt: skip

    # A student is no instructor: refused, nothing made.
    refused = api(hub, people["s1"], "POST", "deployments",
                  {"template": "attack-defend", "group": group, "name": "week1"})  # fmt: skip
    assert (refused.status_code, refused.json()["reason"]) == (403, "not_instructor")

    reply = api(hub, people["teacher"], "POST", "deployments",
                {"template": "attack-defend", "group": group, "name": "week1"})  # fmt: skip
    assert reply.status_code == 201, reply.text
    deployment = reply.json()
    assert deployment["students"] == students  # the teacher gets no copy
    assert deployment["refused"] == {}
    assert len(deployment["labs"]) == 3

    # Each student owns one copy and sees only it.
    lab_ids = {}
    for i in (1, 2, 3):
        labs = api(hub, people[f"s{i}"], "GET", "labs").json()
        assert [(lab["owner"], lab["name"]) for lab in labs] == [(people[f"s{i}-name"], "week1")]
        assert [vm["name"] for vm in labs[0]["vms"]] == ["week1-attacker", "week1-target"]
        lab_ids[i] = labs[0]["id"]
    other = api(hub, people["s1"], "GET", f"labs/{lab_ids[2]}")
    assert (other.status_code, other.json()["reason"]) == (404, "no_lab")
    # The teacher sees every copy of the deployment; an outsider sees none of it.
    for lab_id in lab_ids.values():
        assert api(hub, people["teacher"], "GET", f"labs/{lab_id}").status_code == 200
        assert api(hub, people["outsider"], "GET", f"labs/{lab_id}").status_code == 404
    seen = api(hub, people["teacher"], "GET", f"deployments/{deployment['id']}").json()
    assert sorted(lab["owner"] for lab in seen["labs"]) == students
    assert api(hub, people["outsider"], "GET", f"deployments/{deployment['id']}").status_code == 404

    # Grading runs every student's checks (the test driver's VMs have no SSH: all fail).
    graded = api(hub, people["teacher"], "POST", f"deployments/{deployment['id']}/check")
    assert graded.status_code == 200, graded.text
    rows = graded.json()["labs"]
    assert sorted(r["owner"] for r in rows) == students
    assert all(r["max_score"] > 0 and r["score"] == 0 for r in rows)

    # The teacher's Grading notebook, run headless with nbclient against the real Hub,
    # writes one row per student and a chart.
    import csv

    from tests.unit.test_grading_notebook import grading, run

    work = hub.workdir / "grading"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWARGA_", "JUPYTERHUB_"))}
    env |= {"TWARGA_URL": f"{hub.url}/services/twarga/", "TWARGA_TOKEN": people["teacher"]}
    run(grading(), work, env, deployment_id=deployment["id"], output_dir=str(work / "out"))
    with open(work / "out" / "grades.csv", newline="") as table:
        grades = list(csv.DictReader(table))
    assert sorted(row["student"] for row in grades) == students
    assert all(float(row["max_score"]) == 2 for row in grades)
    assert (work / "out" / "grades.svg").read_text().lstrip().startswith(("<svg", "<?xml"))

    # The teacher may not deploy to a group they are not in.
    elsewhere = f"other-{uuid.uuid4().hex[:6]}"
    assert hub_api(hub, admin, "POST", f"groups/{elsewhere}").status_code == 201
    no = api(hub, people["teacher"], "POST", "deployments",
             {"template": "attack-defend", "group": elsewhere, "name": "week1"})  # fmt: skip
    assert (no.status_code, no.json()["reason"]) == (403, "not_instructor")
