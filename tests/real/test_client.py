"""The Python API (``twarga_lab.client``) against a real running service and a real guest."""

from __future__ import annotations

import pytest

from twarga_lab.client import (
    AuthenticationError,
    BadRequest,
    Conflict,
    Lab,
    PermissionDenied,
    QuotaExceeded,
    ServiceUnavailable,
    ValidationError,
    VMNotFound,
)

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def lab(live_server):
    return Lab(live_server.url, "alice-token")


def test_full_lifecycle_of_a_real_guest(lab):
    assert lab.me()["name"] == "alice"
    assert "twarga/tiny" in [i["name"] for i in lab.images()]
    vm = lab.vms.create("cli-1", ram=512, cpu=1, disk=10)
    assert vm.status in ("pending", "running")
    vm.wait("running", timeout=120, progress=False)
    assert lab.vms["cli-1"].id == vm.id
    assert "Linux cli-1" in vm.run("uname -a", timeout=90)
    assert vm.run("echo $((6*7))") == "42"
    vm.stop()
    vm.wait("stopped", timeout=60, progress=False)
    vm.start()
    vm.wait("running", timeout=60, progress=False)
    assert vm.run("echo back", timeout=90) == "back"
    frame = lab.vms.dataframe()
    assert {"id", "name", "status", "ram", "uptime"} <= set(frame.columns)
    assert frame.loc[frame["name"] == "cli-1", "status"].item() == "running"
    vm.destroy()
    with pytest.raises(VMNotFound):
        lab.vms["cli-1"]
    with pytest.raises(KeyError):  # VMNotFound is a KeyError too
        lab.vms[vm.id]


def test_dataframes_have_the_right_columns(lab):
    events = lab.soc.events(limit=20)
    assert list(events.columns) == lab.soc.COLUMNS
    assert len(events) > 0
    history = lab.metrics.history("cpu_usage", since="-1h")
    assert list(history.columns) == ["time", "value"]
    assert history.attrs["metric"] == "cpu_usage"
    users = Lab(lab.url, "admin-token").admin.users()
    assert {"name", "credits", "vm_count", "active"} <= set(users.columns)
    assert "alice" in set(users["name"])


def test_each_error_class(lab, live_server):
    with pytest.raises(ValidationError) as bad_name:
        lab.vms.create("Bad_Name")
    assert bad_name.value.field == "name" and bad_name.value.status == 422
    with pytest.raises(BadRequest):
        lab.request("POST", "vms", ["not", "an", "object"])
    with pytest.raises(AuthenticationError):
        Lab(live_server.url, "wrong-token").me()
    with pytest.raises(PermissionDenied):
        lab.admin.users()
    with pytest.raises(VMNotFound):
        lab.vms[999999]
    admin = Lab(live_server.url, "admin-token")
    bob = Lab(live_server.url, "bob-token")
    bob.me()  # Twarga meets bob
    admin.admin.set_quota("bob", max_vms=1)
    first = bob.vms.create("only-one")
    with pytest.raises(Conflict) as taken:
        bob.vms.create("only-one")
    assert taken.value.reason == "name_taken"
    with pytest.raises(QuotaExceeded) as over:
        bob.vms.create("second")
    assert "at most 1" in over.value.message
    first.wait("running", timeout=120, progress=False)
    first.destroy()
    with pytest.raises(ServiceUnavailable):
        Lab("http://127.0.0.1:9/", "x").me()
    with pytest.raises(TimeoutError):
        lab.vms.create("slow", wait=False).wait("paused", timeout=1, progress=False)
    lab.vms["slow"].destroy()
