"""The typed requests: each accepts the API's valid forms (the seed's aliases too) and
refuses bad ones with the status and reason code the API answers with."""

from __future__ import annotations

import math
from typing import Any

import pytest

from twarga_lab.errors import InvalidRequest, TwargaError, ValidationFailed
from twarga_lab.schemas import (
    SCHEMAS,
    UNSET,
    CreateSnapshot,
    CreateVM,
    EventQuery,
    GrantCredits,
    HistoryQuery,
    SetQuota,
    SetSSHKey,
    UpdateVM,
    VMAction,
)
from twarga_lab.schemas.me import MAX_SSH_KEY_CHARS

NOW = 1_800_000_000.0
DAY = 86400.0
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ5 alice@laptop"


def refusal(call: Any, *args: Any, **kwargs: Any) -> tuple[int, str, str | None]:
    """``(status, reason, field)`` of the error ``call`` raises."""
    with pytest.raises(TwargaError) as caught:
        call(*args, **kwargs)
    error = caught.value
    return error.status_code, error.reason, error.details.get("field")  # type: ignore[return-value]


# -- the shape of bodies -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "message"),
    [
        ([], "bad_body", "the request body must be a JSON object"),
        ("key", "bad_body", "the request body must be a JSON object"),
        ({}, "missing_field", "'ssh_public_key' is required"),
        ({"ssh_public_key": KEY, "x": 1}, "unknown_field", "unknown field 'x'"),
        ({"ssh_public_key": 5}, "bad_type", "'ssh_public_key' must be a string or NoneType"),
    ],
)
def test_a_body_of_the_wrong_shape_is_400(body: Any, reason: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SetSSHKey.from_body(body)
    assert (caught.value.status_code, caught.value.reason, caught.value.message) == (
        400,
        reason,
        message,
    )


def test_bool_is_not_an_integer_nor_a_float_an_integer() -> None:
    assert refusal(SetQuota.from_body, {"max_vms": True}) == (400, "bad_type", None)
    assert refusal(SetQuota.from_body, {"max_vms": 2.0}) == (400, "bad_type", None)
    assert refusal(GrantCredits.from_body, {"amount": False, "reason": "x"})[:2] == (
        400,
        "bad_type",
    )


# -- VMs -----------------------------------------------------------------------------


def test_a_create_needs_only_a_name() -> None:
    request = CreateVM.from_body({"name": "web-1"})
    assert request == CreateVM("web-1")
    assert (request.image_name, request.ram, request.cpu, request.disk) == (None, None, None, None)


def test_a_create_takes_the_seeds_os_type_as_the_image() -> None:
    seed = CreateVM.from_body({"name": "web", "os_type": "twarga/tiny", "ram": 1024})
    assert (seed.image_name, seed.image_field, seed.ram) == ("twarga/tiny", "os_type", 1024)
    ours = CreateVM.from_body({"name": "web", "image": "debian/12", "cpu": 2, "disk": 20})
    assert (ours.image_name, ours.image_field, ours.cpu, ours.disk) == ("debian/12", "image", 2, 20)
    both = CreateVM.from_body({"name": "web", "image": "debian/12", "os_type": "debian/12"})
    assert both.image_name == "debian/12"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, (400, "missing_field", None)),
        ({"image": "twarga/tiny"}, (400, "missing_field", None)),
        ({"name": "web", "colour": "red"}, (400, "unknown_field", None)),
        ({"name": "web", "ram": "1024"}, (400, "bad_type", None)),
        ({"name": "web", "ram": 1024.0}, (400, "bad_type", None)),
        ({"name": "web", "cpu": True}, (400, "bad_type", None)),
        ({"name": "web", "image": None}, (400, "bad_type", None)),
        ({"name": "Web"}, (422, "invalid_name", "name")),
        ({"name": "web\n"}, (422, "invalid_name", "name")),
        ({"name": "a" * 64}, (422, "invalid_name", "name")),
        (
            {"name": "web", "image": "twarga/tiny", "os_type": "debian/12"},
            (422, "conflicting_fields", "os_type"),
        ),
        # The name is checked before the image's two names, as the API always did.
        ({"name": "Web", "image": "a/b", "os_type": "c/d"}, (422, "invalid_name", "name")),
    ],
)
def test_a_bad_create_is_refused(body: dict[str, Any], expected: tuple) -> None:
    assert refusal(CreateVM.from_body, body) == expected


def test_an_update_names_only_what_it_changes() -> None:
    assert UpdateVM.from_body({}).changes() == {}
    update = UpdateVM.from_body({"ram": 1024, "name": "db"})
    assert update.changes() == {"name": "db", "ram": 1024}
    assert update.cpu is UNSET
    assert refusal(UpdateVM.from_body, {"name": "DB"}) == (422, "invalid_name", "name")
    assert refusal(UpdateVM.from_body, {"disk": 20}) == (400, "unknown_field", None)
    assert refusal(UpdateVM.from_body, {"ram": None}) == (400, "bad_type", None)


def test_actions_and_snapshots_need_their_one_field() -> None:
    assert VMAction.from_body({"action": "start"}).action == "start"
    assert CreateSnapshot.from_body({"name": "s1"}).name == "s1"
    assert refusal(VMAction.from_body, {}) == (400, "missing_field", None)
    assert refusal(VMAction.from_body, {"action": 1}) == (400, "bad_type", None)
    assert refusal(CreateSnapshot.from_body, {"name": "s1", "memory": True})[1] == "unknown_field"


# -- SSH key -------------------------------------------------------------------------


def test_ssh_key_is_one_line_with_single_spaces_or_none() -> None:
    assert SetSSHKey.from_body({"ssh_public_key": KEY}).ssh_public_key == KEY
    spaced = "  ssh-ed25519   AAAAC3NzaC1lZDI1NTE5AAAAIJ5\talice@laptop \n"
    assert SetSSHKey.from_body({"ssh_public_key": spaced}).ssh_public_key == KEY
    assert SetSSHKey.from_body({"ssh_public_key": None}).ssh_public_key is None
    assert SetSSHKey.from_body({"ssh_public_key": "   "}).ssh_public_key is None


@pytest.mark.parametrize(
    "key", ["hello\nworld", "ssh-ed25519", "ssh-dss AAAAB3 me", f"{KEY}\n{KEY}"]
)
def test_a_bad_ssh_key_is_422_invalid_ssh_key(key: str) -> None:
    assert refusal(SetSSHKey.from_body, {"ssh_public_key": key}) == (
        422,
        "invalid_ssh_key",
        "ssh_public_key",
    )


def test_a_huge_ssh_key_is_422_too_long() -> None:
    key = "ssh-rsa " + "A" * MAX_SSH_KEY_CHARS
    assert refusal(SetSSHKey.from_body, {"ssh_public_key": key}) == (
        422,
        "ssh_key_too_long",
        "ssh_public_key",
    )


# -- credits and quotas --------------------------------------------------------------


def test_a_grant_takes_a_number_and_a_stripped_reason() -> None:
    grant = GrantCredits.from_body({"amount": 2.5, "reason": "  bonus "})
    assert (grant.amount, grant.amount_milli, grant.reason) == (2.5, 2500, "bonus")
    assert GrantCredits.from_body({"amount": -3, "reason": "refund"}).amount_milli == -3000


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"amount": 1}, (400, "missing_field", None)),
        ({"reason": "x"}, (400, "missing_field", None)),
        ({"amount": "1", "reason": "x"}, (400, "bad_type", None)),
        ({"amount": 1, "reason": "  "}, (422, "missing_reason", "reason")),
        # A blank reason is reported before a zero amount, as the API always did.
        ({"amount": 0, "reason": ""}, (422, "missing_reason", "reason")),
        ({"amount": 0, "reason": "x"}, (422, "invalid_amount", "amount")),
        ({"amount": 0.0001, "reason": "x"}, (422, "invalid_amount", "amount")),
        ({"amount": math.inf, "reason": "x"}, (422, "invalid_amount", "amount")),
        ({"amount": math.nan, "reason": "x"}, (422, "invalid_amount", "amount")),
    ],
)
def test_a_bad_grant_is_refused(body: dict[str, Any], expected: tuple) -> None:
    assert refusal(GrantCredits.from_body, body) == expected


def test_a_quota_patch_names_only_what_it_changes() -> None:
    patch = SetQuota.from_body({"max_vms": 3, "max_cpu": None})
    assert patch.changes() == {"max_vms": 3, "max_cpu": None}
    assert patch.max_ram_mb is UNSET
    assert SetQuota.from_body({}).changes() == {}
    assert SetQuota.from_body({"max_disk_gb": 0}).changes() == {"max_disk_gb": 0}


def test_a_bad_quota_patch_is_refused() -> None:
    assert refusal(SetQuota.from_body, {"max_vms": -1}) == (422, "out_of_range", "max_vms")
    assert refusal(SetQuota.from_body, {"max_gpus": 1}) == (400, "unknown_field", None)
    assert refusal(SetQuota.from_body, {"max_ram_mb": "1"}) == (400, "bad_type", None)


# -- SOC event queries ---------------------------------------------------------------


def test_event_query_defaults_filters_and_all() -> None:
    assert EventQuery.from_query({}) == EventQuery(limit=100)
    query = EventQuery.from_query(
        {"limit": "5", "severity": "critical", "type": "security", "vm_id": "3", "since_id": "9"}
    )
    assert query == EventQuery(5, "critical", "security", 3, since_id=9)
    assert EventQuery.from_query({"limit": "all"}).limit == 1000
    assert EventQuery.from_query({"severity": "", "before_id": ""}) == EventQuery()
    assert EventQuery.from_export_query({}).limit == 10_000
    assert EventQuery.from_export_query({"limit": "all"}).limit == 10_000_000


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"limit": "ten"}, (400, "bad_type", None)),
        ({"vm_id": "1.5"}, (400, "bad_type", None)),
        ({"limit": "0"}, (422, "out_of_range", "limit")),
        ({"limit": "1001"}, (422, "out_of_range", "limit")),
        ({"severity": "loud"}, (422, "unknown_severity", "severity")),
        ({"type": "network"}, (422, "unknown_type", "type")),
        ({"since_id": "1", "before_id": "5"}, (422, "conflict", "since_id")),
    ],
)
def test_a_bad_event_query_is_refused(args: dict[str, str], expected: tuple) -> None:
    assert refusal(EventQuery.from_query, args) == expected


def test_an_export_may_ask_for_more_than_a_listing() -> None:
    assert EventQuery.from_export_query({"limit": "5000"}).limit == 5000
    assert refusal(EventQuery.from_export_query, {"limit": "10000001"})[:2] == (
        422,
        "out_of_range",
    )


# -- metrics history -----------------------------------------------------------------


def history(**args: str) -> HistoryQuery:
    return HistoryQuery.from_query(args, now=NOW, max_window=90 * DAY)


def test_history_defaults_to_the_last_hour() -> None:
    query = history(entity="host", metric="cpu_usage")
    assert (query.entity, query.entity_id, query.metric) == ("host", None, "cpu_usage")
    assert (query.since, query.until, query.step) == (NOW - 3600, NOW, None)
    assert query.series_names() == ("cpu_usage",)


def test_history_times_iso_unix_relative_and_step() -> None:
    query = history(
        entity="vm", id="7", metric="memory_usage", since="-6h", until="2027-01-15T08:00:00"
    )
    until = 1_800_000_000.0 - 1_800_000_000.0 % 3600  # 2027-01-15T08:00:00Z
    assert (query.entity_id, query.until, query.since) == (7, until, NOW - 6 * 3600)
    assert history(entity="host", metric="cpu_usage", since="1799990000").since == 1799990000.0
    assert history(entity="host", metric="cpu_usage", step="60").step == 60.0


def test_history_takes_the_seed_names() -> None:
    query = history(vm_id="4", metric_type="cpu", hours="2")
    assert (query.entity, query.entity_id, query.metric) == ("vm", 4, "cpu_usage")
    assert (query.since, query.until) == (NOW - 7200, NOW)
    # A bare negative number is seconds before now, not 1969.
    assert history(entity="host", metric="cpu_usage", since="-300").since == NOW - 300
    network = history(entity="vm", id="4", metric="network")
    assert network.metric == "network"
    assert set(network.series_names()) == {"net_sent_bytes_per_s", "net_recv_bytes_per_s"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"metric": "cpu_usage"}, (400, "missing_field", None)),
        ({"entity": "disk", "metric": "cpu_usage"}, (422, "bad_entity", "entity")),
        ({"entity": "vm", "metric": "cpu_usage"}, (400, "missing_field", None)),
        ({"entity": "vm", "id": "x", "metric": "cpu_usage"}, (400, "bad_type", None)),
        ({"entity": "host"}, (400, "missing_field", None)),
        ({"entity": "vm", "id": "1", "metric": "swap_usage"}, (422, "unknown_metric", "metric")),
        ({"entity": "host", "metric": "cpu_usage", "since": "soon"}, (400, "bad_type", None)),
        (
            {"entity": "host", "metric": "cpu_usage", "since": "-1h", "hours": "2"},
            (422, "conflicting_fields", "hours"),
        ),
        ({"entity": "host", "metric": "cpu_usage", "hours": "x"}, (400, "bad_type", None)),
        ({"entity": "host", "metric": "cpu_usage", "hours": "-1"}, (422, "bad_window", "hours")),
        (
            {"entity": "host", "metric": "cpu_usage", "since": "now", "until": "-1h"},
            (422, "bad_window", "since"),
        ),
        (
            {"entity": "host", "metric": "cpu_usage", "since": "-91d"},
            (422, "window_too_long", "since"),
        ),
        ({"entity": "host", "metric": "cpu_usage", "step": "fast"}, (400, "bad_type", None)),
        ({"entity": "host", "metric": "cpu_usage", "step": "0.5"}, (422, "bad_step", "step")),
        ({"entity": "host", "metric": "cpu_usage", "step": "7200"}, (422, "bad_step", "step")),
        (
            {"entity": "host", "metric": "cpu_usage", "since": "-30d", "step": "60"},
            (422, "too_many_points", "step"),
        ),
    ],
)
def test_a_bad_history_query_is_refused(args: dict[str, str], expected: tuple) -> None:
    assert refusal(history, **args) == expected


# -- describing fields ---------------------------------------------------------------


def test_every_schema_describes_its_fields() -> None:
    for schema in SCHEMAS:
        docs = schema.describe()
        assert docs, schema
        for doc in docs:
            assert doc.doc and doc.types, (schema, doc)
    quota = {d.name: d for d in SetQuota.describe()}
    assert quota["max_vms"].types == ("integer", "null") and not quota["max_vms"].required
    grant = {d.name: d for d in GrantCredits.describe()}
    assert grant["amount"].required and grant["amount"].types == ("integer", "number")
    assert SetSSHKey.describe()[0].required  # must be named, even as null
    create = {d.name: d for d in CreateVM.describe()}
    assert create["image"].aliases == ("os_type",) and "os_type" not in create
    assert create["name"].required and not create["ram"].required
    assert set(CreateVM.body_types()) == {"name", "image", "os_type", "ram", "cpu", "disk"}


def test_query_schemas_list_the_names_they_read() -> None:
    assert set(HistoryQuery.wire_names()) == {
        "entity", "id", "metric", "since", "until", "step", "metric_type", "hours", "vm_id",
    }  # fmt: skip
    assert "series" not in HistoryQuery.wire_names()  # derived while parsing
    since = next(d for d in HistoryQuery.describe() if d.name == "since")
    assert (since.default, since.aliases, since.required) == ("-1h", ("hours",), False)
    assert set(EventQuery.wire_names()) == {
        "limit", "severity", "type", "vm_id", "since_id", "before_id",
    }  # fmt: skip


def test_a_validation_error_carries_its_field() -> None:
    with pytest.raises(ValidationFailed) as caught:
        SetQuota.from_body({"max_cpu": -2})
    assert (caught.value.field, caught.value.message) == ("max_cpu", "max_cpu must be 0 or more")
