"""schemathesis against a live Twarga service (a ``jupyter server`` subprocess on libvirt's
``test:///default``): every operation of ``/twarga/api/openapi.json``, as a normal user and
as an admin, gets generated requests (valid ones, then invalid ones); no answer may be a
5xx, have a status, content type or headers the document does not list, or a body that
violates the document's schema. Destructive routes run too: the test driver boots nothing.

The run is bounded (``MAX_EXAMPLES`` per operation and mode, no deadline, no shrinking:
every failure is recorded as found) and prints operations, cases and time.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import REPO, make_placeholder_image
from tests.helpers import free_port
from twarga_lab.handlers import ROUTES

VENV_BIN = Path(sys.executable).parent
MAX_EXAMPLES = int(os.environ.get("TWARGA_SCHEMATHESIS_EXAMPLES", "20"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
TOKENS = {"user": "alice-token", "admin": "admin-token"}
# The routes as the server matches them: a negative case whose path matches none of them
# (``/vms/null``) never reaches Twarga Lab; Jupyter's own HTML 404 page answers it.
ROUTE_PATTERNS = [re.compile(pattern) for pattern, *_ in ROUTES]


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a ``jupyter server`` with Twarga Lab on ``test:///default`` and the
    fake Hub identity (tests/identity.py); its log is kept under test-artifacts."""
    work = tmp_path_factory.mktemp("schemathesis")
    make_placeholder_image(work / "images")
    port = free_port()
    prefix = f"tst{secrets.token_hex(3)}-"
    argv = [
        str(VENV_BIN / "jupyter"), "server", "--no-browser", "--allow-root",
        "--ip=127.0.0.1", f"--port={port}", f"--ServerApp.root_dir={work}",
        "--ServerApp.identity_provider_class=tests.identity.FakeHubIdentityProvider",
        "--TwargaLabApp.libvirt_uri=test:///default",
        f"--TwargaLabApp.vms_dir={work / 'vms'}",
        f"--TwargaLabApp.images_dir={work / 'images'}",
        f"--TwargaLabApp.db_url=sqlite:///{work / 'twarga.db'}",
        f"--TwargaLabApp.domain_prefix={prefix}",
        "--TwargaLabApp.syslog_address=127.0.0.1:0",
        "--TwargaLabApp.stop_timeout=2",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    log = work / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                reply = httpx.get(url + "twarga/api/me", headers=auth("user"))
                if reply.status_code == 200:
                    break
            except httpx.HTTPError:
                pass  # not listening yet
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)
        artifacts = REPO / "test-artifacts" / "live-servers"
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, artifacts / f"schemathesis-{prefix.rstrip('-')}.log")


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"token {TOKENS[role]}"}


def seed(url: str, role: str) -> None:
    """Things the generated ids can hit: a VM (with a snapshot) and a lab of the caller."""
    with httpx.Client(base_url=url + "twarga/api/", headers=auth(role), timeout=30) as client:
        for name in ("web", "db"):
            assert client.post("vms", json={"name": f"{role}-{name}"}).status_code == 201
        client.post("vms/1/snapshots", json={"name": "s1"})


def run_operation(
    operation: Any, url: str, role: str, mode: GenerationMode, statuses: Counter[int]
) -> tuple[int, int, list[str]]:
    """Generated cases of one operation in one mode: (cases sent, cases outside every
    route, failures found)."""
    failures: list[str] = []
    cases = outside = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def test(case: Any) -> None:
        nonlocal cases, outside
        if not any(p.fullmatch(case.formatted_path) for p in ROUTE_PATTERNS):
            outside += 1
            return
        cases += 1
        if mode is GenerationMode.NEGATIVE:
            case.headers = {k: v for k, v in (case.headers or {}).items()
                            if k.lower() != "authorization"}  # fmt: skip
        headers = auth(role)
        try:
            response = case.call(base_url=url.rstrip("/"), headers=headers, timeout=30)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, FailureGroup) as error:  # every failure is reported, not raised
            failures.append(f"{case.method} {case.formatted_path} [{mode.value}]: {error}")

    test()
    return cases, outside, failures


@pytest.mark.parametrize("role", ["user", "admin"])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(service: str, role: str) -> None:
    seed(service, role)
    served = httpx.get(service + "twarga/api/openapi.json", headers=auth(role))
    assert served.status_code == 200
    document = served.json()
    # from_dict, not from_url: schemathesis leaves out the operation a schema was loaded from.
    schema = schemathesis.openapi.from_dict(document)
    schema.config.base_url = service.rstrip("/")
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    operations = cases = outside = 0
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            ran, skipped, found = run_operation(operation, service, role, mode, statuses)
            cases, outside = cases + ran, outside + skipped
            failures.extend(found)
    elapsed = time.monotonic() - started
    print(
        f"\nschemathesis as {role}: {operations} operations, {cases} cases sent "
        f"({outside} negative paths outside every route not sent), "
        f"{len(failures)} failures, {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}"
    )
    assert operations == sum(len(item) for item in document["paths"].values()) >= 41
    assert not any(status >= 500 for status in statuses)
    assert not failures, "\n\n".join(failures[:30])


# Numbers schemathesis found (or that its finding led to) which once overflowed the
# database driver with a 500: each is refused now.
OVERFLOWS = [
    ("admin", "POST", "admin/users/alice/credits", {"reason": "x", "amount": -1.79e308}, 422),
    ("admin", "POST", "admin/users/alice/credits", {"reason": "x", "amount": 1e300}, 422),
    ("admin", "PATCH", "admin/users/alice/quota", {"max_vms": 10**26}, 422),
    ("admin", "PATCH", "admin/users/alice/quota", {"max_ram_mb": 2**63}, 422),
    ("user", "GET", "soc/events?vm_id=100000000000000000000000000", None, 422),
    ("user", "GET", "soc/events?since_id=9223372036854775808", None, 422),
    ("user", "GET", "metrics/history?entity=vm&metric=cpu&id=9" + "9" * 20, None, 422),
    ("user", "GET", "vms/100000000000000000000000000", None, 404),
    ("user", "DELETE", "vms/2147483648", None, 404),
    ("user", "GET", "vms/2147483648/snapshots", None, 404),
    ("user", "GET", "metrics/vm/99999999999999999999", None, 404),
    ("user", "GET", "labs/99999999999999999999", None, 404),
    ("user", "GET", "deployments/99999999999999999999", None, 404),
]  # fmt: skip


@pytest.mark.parametrize(("role", "method", "path", "body", "status"), OVERFLOWS)
def test_numbers_past_the_database_integers_are_refused(service, role, method, path, body, status):
    reply = httpx.request(
        method, service + "twarga/api/" + path, json=body, headers=auth(role), timeout=30
    )
    assert reply.status_code == status, reply.text
    assert set(reply.json()) >= {"message", "reason"}


def test_an_empty_export_keeps_its_content_type(service):
    # Found by schemathesis: with no event to write, the JSON lines export was labelled JSON.
    for fmt, media in (("jsonl", "application/x-ndjson"), ("csv", "text/csv")):
        reply = httpx.get(
            f"{service}twarga/api/soc/events.{fmt}?since_id=2147483000", headers=auth("user")
        )
        assert reply.status_code == 200
        assert reply.headers["Content-Type"].startswith(media), (fmt, reply.headers)
