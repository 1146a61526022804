"""A small fake of Twarga's labs API (``/twarga/api/labs``, ``/deployments``,
``/lab-templates``) on 127.0.0.1, for the client's labs tests and the Grading notebook.

It answers with the JSON of /work/notes/labs-contract.md from memory: tokens are
``<user>-token``, ``teacher`` is an admin, a lab is ``pending`` for ``boot_seconds`` after it
is made and then ``running``, and a check passes when its name is in
``fake.solved[owner]``. It runs in a thread of the test process (``with FakeTwarga() as
fake: fake.url``), so the notebook's kernel, another process, reaches it over HTTP too.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ATTACK_DEFEND: dict[str, Any] = {
    "schema": "twarga-lab-template/v1",
    "name": "attack-defend",
    "title": "Attacker and target",
    "networks": [{"name": "lan", "cidr": "10.77.0.0/24"}],
    "machines": [
        {
            "name": "attacker",
            "image": "twarga/tiny",
            "networks": [{"network": "lan", "address": "10.77.0.11"}],
        },
        {
            "name": "target",
            "image": "twarga/tiny",
            "networks": [{"network": "lan", "address": "10.77.0.12"}],
        },
    ],
    "checks": [
        {"name": "attacker reaches target", "machine": "attacker", "run": "ping", "points": 1},
        {"name": "target is hardened", "machine": "target", "run": "true", "points": 2},
    ],
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


def _now() -> str:
    return datetime.now(UTC).isoformat()


class FakeTwarga:
    """The fake service: ``url``, ``token(user)``, ``groups``, ``solved``, ``labs``."""

    def __init__(
        self,
        groups: dict[str, list[str]] | None = None,
        admins: tuple[str, ...] = ("teacher",),
        boot_seconds: float = 0.3,
    ) -> None:
        self.groups = groups or {"sec101": ["alice", "bob", "carol"]}
        self.admins = set(admins)
        self.boot_seconds = boot_seconds
        self.templates = {ATTACK_DEFEND["name"]: ATTACK_DEFEND}
        self.solved: dict[str, set[str]] = {}
        self.labs: dict[int, dict[str, Any]] = {}
        self.deployments: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str]] = []  # (user, method, path)
        self._next = {"lab": 1, "vm": 100, "deployment": 1}
        self._booted_at: dict[int, float] = {}
        self._checks: dict[int, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    @staticmethod
    def token(user: str) -> str:
        return f"{user}-token"

    def __enter__(self) -> FakeTwarga:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- the API ------------------------------------------------------------------------

    def _id(self, kind: str) -> int:
        value = self._next[kind]
        self._next[kind] += 1
        return value

    def _template(self, ref: Any) -> dict[str, Any]:
        if isinstance(ref, dict):
            if ref.get("schema") != "twarga-lab-template/v1" or not ref.get("machines"):
                raise ApiError(422, "not a lab template", "invalid_template")
            return ref
        if ref not in self.templates:
            raise ApiError(404, f"no lab template {ref!r}", "not_found")
        return self.templates[ref]

    def _lab_json(self, lab: dict[str, Any]) -> dict[str, Any]:
        if lab["status"] == "pending" and time.monotonic() >= self._booted_at[lab["id"]]:
            lab["status"] = "running"
            for vm in lab["vms"]:
                vm["status"] = "running"
        return json.loads(json.dumps(lab))

    def _make_lab(self, owner: str, template: dict[str, Any], name: str, dep: int | None):
        if any(x["owner"] == owner and x["name"] == name for x in self.labs.values()):
            raise ApiError(409, f"{owner} already has a lab {name!r}", "name_taken")
        lab_id = self._id("lab")
        vms = []
        for machine in template["machines"]:
            count = machine.get("count", 1)
            for n in range(count):
                instance = machine["name"] if count == 1 else f"{machine['name']}-{n + 1}"
                vm_id = self._id("vm")
                vms.append(
                    {
                        "id": vm_id,
                        "name": f"{name}-{instance}",
                        "lab_machine": instance,
                        "status": "pending",
                        "ssh_port": 22000 + vm_id,
                        "addresses": {
                            nic["network"]: nic.get("address", "")
                            for nic in machine.get("networks", [])
                        },
                        "idle_stop_at": None,
                        "lab_id": lab_id,
                        "lab_name": name,
                    }
                )
        lab = {
            "id": lab_id,
            "name": name,
            "owner": owner,
            "template": template["name"],
            "status": "pending",
            "deployment_id": dep,
            "created_at": _now(),
            "networks": template.get("networks", []),
            "vms": vms,
            "checks": [c["name"] for c in template.get("checks", [])],
        }
        self._checks[lab_id] = template.get("checks", [])
        self.labs[lab_id] = lab
        self._booted_at[lab_id] = time.monotonic() + self.boot_seconds
        return lab

    def _visible(self, user: str, lab: dict[str, Any]) -> bool:
        return user in self.admins or lab["owner"] == user

    def _get_lab(self, user: str, lab_id: int) -> dict[str, Any]:
        lab = self.labs.get(lab_id)
        if lab is None or lab["status"] == "destroyed" or not self._visible(user, lab):
            raise ApiError(404, f"no lab {lab_id}", "not_found")
        return lab

    def _check(self, lab: dict[str, Any]) -> dict[str, Any]:
        solved = self.solved.get(lab["owner"], set())
        results = []
        for check in self._checks[lab["id"]]:
            points = float(check.get("points", 1))
            passed = check["name"] in solved and self._lab_json(lab)["status"] == "running"
            results.append(
                {
                    "check": check["name"],
                    "machine": check["machine"],
                    "passed": passed,
                    "points": points,
                    "score": points if passed else 0.0,
                    "exit_code": 0 if passed else 1,
                    "output": "1 packets received\n" if passed else "",
                    "error": None,
                }
            )
        return {
            "lab_id": lab["id"],
            "lab": lab["name"],
            "owner": lab["owner"],
            "results": results,
            "score": sum(r["score"] for r in results),
            "max_score": sum(r["points"] for r in results),
        }

    def _deployment_json(self, dep: dict[str, Any]) -> dict[str, Any]:
        labs = [self._lab_json(self.labs[i]) for i in dep["lab_ids"]]
        body = {k: v for k, v in dep.items() if k != "lab_ids"}
        labs = [lab for lab in labs if lab["status"] != "destroyed"]
        return {**body, "students": sorted(lab["owner"] for lab in labs), "labs": labs}

    def handle(self, user: str, method: str, path: str, body: Any, query: str) -> Any:
        with self._lock:
            return self._handle(user, method, path, body, query)

    def _handle(self, user: str, method: str, path: str, body: Any, query: str) -> Any:
        self.requests.append((user, method, path))
        if (method, path) == ("GET", "lab-templates"):
            return 200, [
                {**t, "machines_count": len(t["machines"]), "vm_count": len(t["machines"])}
                for t in self.templates.values()
            ]
        if (method, path) == ("GET", "labs"):
            everyone = "all=1" in query and user in self.admins
            labs = [self._lab_json(x) for x in self.labs.values() if x["status"] != "destroyed"]
            return 200, [x for x in labs if everyone or x["owner"] == user]
        if (method, path) == ("POST", "labs"):
            template = self._template(body.get("template"))
            return 201, self._lab_json(self._make_lab(user, template, body["name"], None))
        if match := re.fullmatch(r"labs/(\d+)", path):
            lab = self._get_lab(user, int(match.group(1)))
            if method == "DELETE":
                lab["status"] = "destroyed"
                return 204, None
            return 200, self._lab_json(lab)
        if match := re.fullmatch(r"labs/(\d+)/action", path):
            lab = self._get_lab(user, int(match.group(1)))
            action = body.get("action")
            if action not in ("start", "stop", "destroy"):
                raise ApiError(422, "action must be one of start, stop, destroy", "bad_action")
            if action == "destroy":
                lab["status"] = "destroyed"
                return 200, self._lab_json(lab)
            status = "stopped" if action == "stop" else "pending"
            if action == "start":
                self._booted_at[lab["id"]] = time.monotonic() + self.boot_seconds
            lab["status"] = status
            for vm in lab["vms"]:
                vm["status"] = status
            return 200, self._lab_json(lab)
        if match := re.fullmatch(r"labs/(\d+)/check", path):
            return 200, self._check(self._get_lab(user, int(match.group(1))))
        if (method, path) == ("GET", "deployments"):
            deps = [d for d in self.deployments.values() if self._teaches(user, d)]
            return 200, [self._deployment_json(d) for d in deps]
        if (method, path) == ("POST", "deployments"):
            if user not in self.admins:
                raise ApiError(403, "only an admin or the group's instructor", "forbidden")
            if body.get("group") not in self.groups:
                raise ApiError(404, f"no Hub group {body.get('group')!r}", "not_found")
            template = self._template(body.get("template"))
            dep_id = self._id("deployment")
            dep = {
                "id": dep_id,
                "name": body["name"],
                "template": template["name"],
                "group": body["group"],
                "created_by": user,
                "created_at": _now(),
                "lab_ids": [],
            }
            for student in self.groups[body["group"]]:
                lab = self._make_lab(student, template, body["name"], dep_id)
                dep["lab_ids"].append(lab["id"])
            self.deployments[dep_id] = dep
            return 201, {**self._deployment_json(dep), "refused": {}}
        if match := re.fullmatch(r"deployments/(\d+)(/check)?", path):
            dep = self.deployments.get(int(match.group(1)))
            if dep is None or not self._teaches(user, dep):
                raise ApiError(404, f"no deployment {match.group(1)}", "not_found")
            if not match.group(2):
                return 200, self._deployment_json(dep)
            view = self._deployment_json(dep)
            graded = [self._check(self.labs[lab["id"]]) for lab in view["labs"]]
            return 200, {
                "deployment_id": dep["id"],
                "name": dep["name"],
                "group": dep["group"],
                "template": dep["template"],
                "labs": graded,
            }
        raise ApiError(404, f"no such API path {path!r}", "not_found")

    def _teaches(self, user: str, dep: dict[str, Any]) -> bool:
        return user in self.admins or dep["created_by"] == user

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass  # quiet: a failing test shows the client's error, not access lines

            def _serve(self, method: str) -> None:
                path, _, query = self.path.partition("?")
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    if not path.startswith("/twarga/api/"):
                        raise ApiError(404, "not the API", "not_found")
                    if scheme.lower() != "token" or not token.endswith("-token"):
                        raise ApiError(401, "no or a wrong token", "unauthenticated")
                    body = json.loads(raw) if raw else {}
                    user = token.removesuffix("-token")
                    status, answer = fake.handle(
                        user, method, path.removeprefix("/twarga/api/"), body, query
                    )
                except ApiError as e:
                    status, answer = e.status, {"message": e.message, "reason": e.reason}
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        return Handler
