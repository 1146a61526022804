"""The OpenAPI document (``twarga_lab.openapi``) is valid OpenAPI 3.1 and says exactly what
the route table serves: every pattern and method of ``handlers.ROUTES`` is an operation of
the document and every operation is a route; request bodies and queries are the schemas'."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from schemathesis.specs.openapi.definitions import OPENAPI_31
from tornado.web import RequestHandler

from twarga_lab import openapi
from twarga_lab.errors import InvalidRequest
from twarga_lab.handlers import ROUTES
from twarga_lab.schemas import SCHEMAS

METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.build_document(ROUTES, "/services/twarga/")


def route_operations() -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) of every route, walked the way tornado dispatches."""
    found = set()
    for pattern, handler, *_ in ROUTES:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
        for method in METHODS:
            if getattr(handler, method) is not getattr(RequestHandler, method):
                found.add((method.upper(), path))
    return found


def document_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in document["paths"].items() for m in item}


def schemas_in(node: Any) -> list[dict[str, Any]]:
    """Every JSON Schema the document holds (components, parameters, bodies, responses)."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                found.append(value)
            elif key == "schemas" and isinstance(value, dict):
                found.extend(value.values())
            else:
                found.extend(schemas_in(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(schemas_in(item))
    return found


def test_the_document_is_valid_openapi_3_1(document):
    # The OpenAPI Initiative's 3.1 meta-schema, as schemathesis ships it.
    Draft202012Validator(OPENAPI_31).validate(document)
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "/services/twarga"}]
    json.dumps(document)  # served as JSON: nothing but JSON types in it
    schemas = schemas_in(document)
    assert len(schemas) > 100
    for schema in schemas:
        Draft202012Validator.check_schema(schema)
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(document)))
    assert refs <= set(document["components"]["schemas"])


def test_route_table_and_document_agree(document):
    routes, documented = route_operations(), document_operations(document)
    assert routes - documented == set(), "routes the document lacks"
    assert documented - routes == set(), "operations no route serves"
    assert ("GET", "/twarga/api/openapi.json") in documented
    assert ("GET", "/twarga/metrics") in documented
    assert ("GET", "/twarga/api/vms/{vm_id}/console") in documented
    # No stale entries: every documented handler method exists in the table.
    served = {(h.__name__, m) for _, h, *_ in ROUTES for m in openapi.handler_methods(h)}
    assert set(openapi.OPERATIONS) == served


def test_a_route_missing_from_the_operations_is_an_error():
    class NewHandler(RequestHandler):
        def get(self) -> None: ...

    NewHandler.get.__module__ = "twarga_lab.handlers.new"
    with pytest.raises(openapi.UndocumentedRoute, match=r"NewHandler\.get"):
        openapi.build_document([*ROUTES, (r"/twarga/api/new", NewHandler)])


def test_path_parameters_follow_the_patterns(document):
    vm = document["paths"]["/twarga/api/vms/{vm_id}"]["get"]["parameters"]
    assert vm == [
        {"name": "vm_id", "in": "path", "required": True,
         "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}
    ]  # fmt: skip
    snapshot = document["paths"]["/twarga/api/vms/{vm_id}/snapshots/{name}"]["delete"]
    assert [p["name"] for p in snapshot["parameters"]] == ["vm_id", "name"]
    assert snapshot["parameters"][1]["schema"]["type"] == "string"
    assert "/twarga/api/soc/events.csv" in document["paths"]


def test_every_request_schema_describes_an_operation(document):
    used = {op.body for op in openapi.OPERATIONS.values()} | {
        op.query for op in openapi.OPERATIONS.values()
    }
    assert set(SCHEMAS) <= used
    create = document["paths"]["/twarga/api/vms"]["post"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["name"]
    assert set(body["properties"]) == {"name", "image", "os_type", "ram", "cpu", "disk"}
    assert body["properties"]["ram"]["type"] == "integer"
    assert body["additionalProperties"] is False
    events = document["paths"]["/twarga/api/soc/events"]["get"]["parameters"]
    assert {p["name"] for p in events} == {
        "limit", "severity", "type", "vm_id", "since_id", "before_id"
    }  # fmt: skip
    history = {p["name"]: p for p in document["paths"]["/twarga/api/metrics/history"]["get"][
        "parameters"]}  # fmt: skip
    assert history["entity"]["required"] and history["metric"]["required"]
    assert {"vm_id", "metric_type", "hours"} <= set(history)


@pytest.mark.parametrize("request_schema", [s for s in SCHEMAS if s.location == "body"])
def test_body_schemas_refuse_what_the_parsers_refuse(request_schema):
    schema = openapi.body_schema(request_schema)
    validator = Draft202012Validator(schema)
    # A field the schema does not know: refused by both.
    assert not validator.is_valid({"no_such_field": 1})
    with pytest.raises(InvalidRequest):
        request_schema.from_body({"no_such_field": 1})
    # Every required field missing: refused by both.
    if request_schema.required:
        assert not validator.is_valid({})
        with pytest.raises(InvalidRequest):
            request_schema.from_body({})


def test_statuses_are_documented(document):
    for path, item in document["paths"].items():
        for method, op in item.items():
            statuses = set(op["responses"])
            assert {"401", "403", "503"} <= statuses, (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= statuses, (method, path)
            if "{" in path:
                assert "404" in statuses, (method, path)
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}
    assert "201" in document["paths"]["/twarga/api/vms"]["post"]["responses"]
    assert "204" in document["paths"]["/twarga/api/vms/{vm_id}"]["delete"]["responses"]
    console = document["paths"]["/twarga/api/vms/{vm_id}/console"]["get"]["responses"]
    assert {"101", "400", "403", "404"} <= set(console)
    metrics = document["paths"]["/twarga/metrics"]["get"]
    assert "text/plain" in metrics["responses"]["200"]["content"]
    assert {"scrapeToken": []} in metrics["security"]


def test_resource_schemas_accept_real_answers(document):
    schemas = document["components"]["schemas"]

    def valid(name: str, instance: Any) -> bool:
        resolver = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
        return Draft202012Validator(resolver).is_valid(instance)

    assert valid("Error", {"message": "no", "reason": "not_found"})
    assert valid("Error", {"message": "bad", "reason": "out_of_range", "field": "ram"})
    assert not valid("Error", {"message": "no"})
    vm = {
        "id": 1, "name": "web1", "owner": "alice", "status": "running", "image": "twarga/tiny",
        "ram": 512, "cpu": 1, "disk": 10, "created_at": "2026-12-03T07:15:52+00:00",
        "ssh_port": None, "addresses": {"lan": "10.77.0.11"},
    }  # fmt: skip
    assert valid("VM", vm)
    assert not valid("VM", {**vm, "status": "exploded"})
    lab = {"id": 1, "name": "l1", "owner": "alice", "template": "attack-defend",
           "status": "partial", "networks": [{"name": "lan", "cidr": "10.77.0.0/24"}],
           "vms": [vm]}  # fmt: skip
    assert valid("Lab", lab)
    event = {"id": 3, "created_at": "2026-12-03T07:15:54+00:00", "type": "vm",
             "severity": "info", "message": "VM web1 created", "details": {}}  # fmt: skip
    assert valid("Event", event)
    assert not valid("Event", {**event, "severity": "loud"})


def test_the_builder_imports_no_tornado():
    import subprocess
    import sys

    code = "import sys, twarga_lab.openapi; assert 'tornado' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_names_and_actions_carry_the_parsers_rules(document):
    def body(path: str, method: str = "post") -> dict[str, Any]:
        return document["paths"][path][method]["requestBody"]["content"]["application/json"][
            "schema"
        ]["properties"]

    name = body("/twarga/api/vms")["name"]
    validator = Draft202012Validator(name)
    assert validator.is_valid("web-1") and not validator.is_valid("Web_1")
    assert body("/twarga/api/vms/{vm_id}/action")["action"]["enum"] == [
        "start", "stop", "restart", "destroy", "force-stop"
    ]  # fmt: skip
    assert body("/twarga/api/vms/{vm_id}/snapshots/{name}")["action"]["enum"] == ["revert"]
    lab_actions = body("/twarga/api/labs/{lab_id}/action")["action"]["enum"]
    assert lab_actions == ["start", "stop", "destroy"]
