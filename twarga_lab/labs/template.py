"""Lab templates: a set of machines joined by private networks, and the checks that grade them.

A template is YAML text (or the same as a dictionary) of the format
``twarga-lab-template/v1`` (``schema/lab-template.v1.json``). :func:`parse_template`
validates it with the JSON Schema, then checks what a schema cannot say: names are unique,
every machine's network is defined, addresses are inside their network and not taken twice,
networks do not overlap, and every check runs on a machine instance that exists.

A machine with ``count: n`` (n > 1) becomes the instances ``name-1`` ... ``name-n`` with
consecutive addresses; an omitted address is the first free one from ``.10`` upward. Every
NIC gets a MAC address derived from its place in the lab, ``52:54:00:7a:II:NN`` (instance
index, NIC index), so the same template always gives the same lab.

Every refusal is a :class:`twarga_lab.errors.ValidationFailed` whose ``field`` says where
(``machines[1].networks[0].address``) and whose ``reason`` says why: ``invalid_template``,
``unknown_image``, ``unknown_network`` or ``bad_address``.

Why it is long: the format's rules and the sentences that explain each refusal to a
student are kept next to each other; split apart, rules and messages drift.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import yaml

from twarga_lab.errors import NotFound, ValidationFailed

__all__ = [
    "MAX_CHECKS",
    "MAX_INSTANCES",
    "MAX_NETWORKS",
    "SCHEMA_PATH",
    "TEMPLATE_SCHEMA",
    "TEMPLATE_SCHEMA_ID",
    "CheckTemplate",
    "LabTemplate",
    "MachineInstance",
    "MachineTemplate",
    "NICInstance",
    "NICTemplate",
    "NetworkTemplate",
    "TemplateCatalogue",
    "load_schema",
    "parse_template",
]

log = logging.getLogger(__name__)

#: The value of a template's ``schema`` key.
TEMPLATE_SCHEMA = "twarga-lab-template/v1"
#: The ``$id`` of the JSON Schema of the format.
TEMPLATE_SCHEMA_ID = "https://twarga-lab.dev/labs/lab-template/v1"
SCHEMA_PATH = Path(__file__).parent / "schema" / "lab-template.v1.json"

MAX_INSTANCES = 10
MAX_NETWORKS = 4
MAX_CHECKS = 50
MAX_RUN_CHARS = 4096
#: The largest YAML text (characters) and template (values, counting repeats) accepted.
MAX_TEXT_CHARS = 256 * 1024
MAX_VALUES = 20_000
#: An omitted address is the first free host address from this offset in the network.
FIRST_AUTO_HOST = 10
DEFAULT_TIMEOUT = 30
DEFAULT_POINTS = 1

TEMPLATE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
NETWORK_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,14}")
MACHINE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,20}")
IMAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(/[a-z0-9][a-z0-9._-]{0,62})?")
CHECK_NAME_RE = re.compile(r"[^\x00-\x1f\x7f]{1,100}")

PRIVATE_NETWORKS = tuple(
    ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
)
MIN_PREFIX, MAX_PREFIX = 16, 29

INVALID = "invalid_template"
UNKNOWN_IMAGE = "unknown_image"
UNKNOWN_NETWORK = "unknown_network"
BAD_ADDRESS = "bad_address"


# -- the objects --------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkTemplate:
    """A private L2 segment of the lab."""

    name: str
    cidr: ipaddress.IPv4Network


@dataclass(frozen=True)
class NICTemplate:
    """A machine's NIC as the template says it: its network and maybe its address."""

    network: str
    address: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class MachineTemplate:
    """A machine as the template says it; ``count`` > 1 makes several instances."""

    name: str
    image: str
    cpu: int | None = None
    ram: int | None = None  # MiB
    disk: int | None = None  # GiB
    count: int = 1
    networks: tuple[NICTemplate, ...] = ()

    def instance_names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        return [f"{self.name}-{n}" for n in range(1, self.count + 1)]


@dataclass(frozen=True)
class CheckTemplate:
    """One graded check: ``run`` on ``machine`` passes when it exits with ``exit_code``
    and, when ``expect`` is set, that regular expression is found in its output."""

    name: str
    machine: str
    run: str
    expect: str | None = None
    exit_code: int = 0
    points: int | float = DEFAULT_POINTS
    timeout: int | float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class NICInstance:
    """A NIC of one VM of the lab: its network, address/prefix and MAC address."""

    network: str
    address: ipaddress.IPv4Address
    prefix: int
    mac: str

    @property
    def interface(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(f"{self.address}/{self.prefix}")


@dataclass(frozen=True)
class MachineInstance:
    """One VM of the lab: ``name`` is ``machine`` or ``machine-N`` (count > 1)."""

    name: str
    machine: str
    image: str
    cpu: int | None
    ram: int | None
    disk: int | None
    nics: tuple[NICInstance, ...]

    @property
    def addresses(self) -> dict[str, str]:
        """``{network: address}``, as the lab's JSON shows them."""
        return {nic.network: str(nic.address) for nic in self.nics}


def _mac(instance_index: int, nic_index: int) -> str:
    return f"52:54:00:7a:{instance_index:02x}:{nic_index:02x}"


@dataclass(frozen=True)
class LabTemplate:
    """A parsed, valid template (make one with :func:`parse_template`).

    ``source`` is the dictionary it was parsed from; it takes no part in equality, so
    the same template from YAML text, a dictionary or :meth:`to_dict` compares equal.
    """

    schema: str
    name: str
    title: str | None
    description: str | None
    networks: tuple[NetworkTemplate, ...]
    machines: tuple[MachineTemplate, ...]
    checks: tuple[CheckTemplate, ...]
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def _instances(self) -> tuple[MachineInstance, ...]:
        return tuple(_expand(self))

    def instances(self) -> list[MachineInstance]:
        """Every VM of the lab, machine by machine, with its NICs' addresses and MACs."""
        return list(self._instances)

    @property
    def vm_count(self) -> int:
        return sum(m.count for m in self.machines)

    def network(self, name: str) -> NetworkTemplate:
        for net in self.networks:
            if net.name == name:
                return net
        raise KeyError(name)

    def total(self, defaults: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(cpu, ram_mb, disk_gb)`` of the whole lab; ``defaults`` (cpu, ram, disk) stand
        in for the sizes a machine leaves out."""
        cpu, ram, disk = defaults
        return (
            sum(i.cpu if i.cpu is not None else cpu for i in self._instances),
            sum(i.ram if i.ram is not None else ram for i in self._instances),
            sum(i.disk if i.disk is not None else disk for i in self._instances),
        )

    def check_images(self, exists: Callable[[str], bool]) -> None:
        """Raise ``unknown_image`` for the first machine whose image ``exists`` denies."""
        known: dict[str, bool] = {}
        for index, machine in enumerate(self.machines):
            if machine.image not in known:
                known[machine.image] = bool(exists(machine.image))
            if not known[machine.image]:
                raise ValidationFailed(
                    f"machine '{machine.name}' uses the image '{machine.image}', which is "
                    "not in the image catalogue",
                    f"machines[{index}].image",
                    UNKNOWN_IMAGE,
                )

    def to_dict(self) -> dict[str, Any]:
        """The template as a dictionary of the format (defaults of checks filled in);
        ``parse_template(t.to_dict()) == t``."""
        data: dict[str, Any] = {"schema": self.schema, "name": self.name}
        if self.title is not None:
            data["title"] = self.title
        if self.description is not None:
            data["description"] = self.description
        data["networks"] = [{"name": n.name, "cidr": str(n.cidr)} for n in self.networks]
        machines = []
        for m in self.machines:
            machine: dict[str, Any] = {"name": m.name, "image": m.image}
            for key in ("cpu", "ram", "disk"):
                if getattr(m, key) is not None:
                    machine[key] = getattr(m, key)
            machine["count"] = m.count
            nics = []
            for nic in m.networks:
                entry: dict[str, Any] = {"network": nic.network}
                if nic.address is not None:
                    entry["address"] = str(nic.address)
                nics.append(entry)
            machine["networks"] = nics
            machines.append(machine)
        data["machines"] = machines
        checks = []
        for c in self.checks:
            check: dict[str, Any] = {"name": c.name, "machine": c.machine, "run": c.run}
            if c.expect is not None:
                check["expect"] = c.expect
            check.update(exit_code=c.exit_code, points=c.points, timeout=c.timeout)
            checks.append(check)
        data["checks"] = checks
        return data


# -- the schema ---------------------------------------------------------------------------


@cache
def _schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The JSON Schema of the format (a fresh copy)."""
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _path(parts: Iterator[Any] | list[Any] | tuple[Any, ...]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


_HINTS = {
    "name": "lower-case letters, digits and '-', starting with a letter",
    "network": "a network name: lower-case letters, digits and '-', starting with a letter",
    "image": "an image name like twarga/tiny",
    "cidr": "a network like 10.77.0.0/24",
    "address": "an IPv4 address like 10.77.0.11",
    "machine": "a machine instance's name, like attacker or web-2",
}


def _schema_error(error: Any) -> ValidationFailed:
    """A student's sentence for the first thing the JSON Schema refuses."""
    parts = list(error.absolute_path)
    where = _path(parts)
    kind = error.validator
    value = error.instance
    if kind == "required":
        missing = next((k for k in error.validator_value if k not in value), "?")
        field_path = _path([*parts, missing])
        place = f"{where} " if where else "the template "
        return ValidationFailed(f"{place}needs '{missing}'", field_path, INVALID)
    if kind == "additionalProperties":
        allowed = set(error.schema.get("properties", {}))
        patterns = [re.compile(p) for p in error.schema.get("patternProperties", {})]
        extra = sorted(
            str(k)
            for k in value
            if k not in allowed and not (isinstance(k, str) and any(p.search(k) for p in patterns))
        )
        name = extra[0] if extra else "?"
        place = f"{where}" if where else "the template"
        return ValidationFailed(
            f"{place} has the unknown key '{name}' (known: {', '.join(sorted(allowed))})",
            _path([*parts, name]),
            INVALID,
        )
    where = where or "template"
    key = parts[-1] if parts and isinstance(parts[-1], str) else ""
    reason = INVALID
    if kind == "const":
        message = f"{where} must be '{error.validator_value}', not {value!r}"
    elif kind == "type":
        wanted = error.validator_value
        wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
        article = "an" if str(wanted)[:1] in "aeiou" else "a"
        message = f"{where} must be {article} {wanted}, not {_kind_of(value)}"
    elif kind == "pattern":
        if key in ("address", "cidr"):
            reason = BAD_ADDRESS
        hint = _HINTS.get(str(key))
        if key == "name" and len(parts) == 1:
            hint = f"{_HINTS['name']}, at most 31 characters"
        elif key == "name" and parts[0] == "machines":
            hint = f"{_HINTS['name']}, at most 21 characters"
        elif key == "name" and parts[0] == "networks":
            hint = f"{_HINTS['name']}, at most 15 characters"
        elif key == "name" and parts[0] == "checks":
            hint = "one line of at most 100 characters"
        message = f"{where} {value!r} is not valid" + (f": {hint}" if hint else "")
    elif kind == "maxItems":
        message = f"{where} may have at most {error.validator_value} entries, not {len(value)}"
    elif kind == "minItems":
        message = f"{where} needs at least {error.validator_value} entry"
    elif kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        bounds = {
            "minimum": "at least",
            "exclusiveMinimum": "more than",
            "maximum": "at most",
            "exclusiveMaximum": "less than",
        }
        message = f"{where} must be {bounds[kind]} {error.validator_value}, not {value!r}"
    elif kind in ("maxLength", "minLength"):
        bound = "at most" if kind == "maxLength" else "at least"
        message = f"{where} must be {bound} {error.validator_value} characters long"
    else:
        message = f"{where}: {error.message}"
    return ValidationFailed(message, where, reason)


def _kind_of(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    names = {dict: "a mapping", list: "a list", str: "a string", int: "a number"}
    for cls, name in names.items():
        if isinstance(value, cls):
            return f"{name} ({value!r})" if cls in (str, int) else name
    if isinstance(value, float):
        return f"a number ({value!r})"
    return f"a {type(value).__name__} ({value!r})"


# -- reading ------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key given twice in one mapping."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor": its keys may be overridden here
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # an unhashable key: construct_mapping says so
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice", key_node.start_mark
            )
    return loader.construct_mapping(node)  # type: ignore[no-untyped-call]


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str) -> Any:
    if len(text) > MAX_TEXT_CHARS:
        raise ValidationFailed(
            f"the template is too long ({len(text)} characters, at most {MAX_TEXT_CHARS})",
            "template",
            INVALID,
        )
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValidationFailed(
            f"the template is not valid YAML{where}: {problem}", "template", INVALID
        ) from None


def _plain(value: Any, budget: list[int]) -> Any:
    """A JSON-like copy of ``value`` (dicts, lists, scalars); refuses huge trees, such as
    YAML aliases repeating a list many times over."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValidationFailed(
            f"the template is too large (more than {MAX_VALUES} values)", "template", INVALID
        )
    if isinstance(value, Mapping):
        return {k: _plain(v, budget) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, budget) for v in value]
    return value


def parse_template(data: Mapping[str, Any] | str) -> LabTemplate:
    """A valid :class:`LabTemplate` from a dictionary or YAML text, or
    :class:`~twarga_lab.errors.ValidationFailed` saying where and why not."""
    if isinstance(data, str):
        data = _load_yaml(data)
    if not isinstance(data, Mapping):
        raise ValidationFailed(
            "a template is a mapping of keys (schema, name, networks, machines, checks), "
            f"not {_kind_of(data)}",
            "template",
            INVALID,
        )
    source = _plain(data, [MAX_VALUES])
    error = next(iter(_validator().iter_errors(source)), None)
    if error is not None:
        raise _schema_error(error)
    template = _build(source)
    _ = template._instances  # addresses: assigned and checked now, not on first use
    return template


def _require(ok: bool, message: str, where: str, reason: str = INVALID) -> None:
    if not ok:
        raise ValidationFailed(message, where, reason)


def _name(value: str, regex: re.Pattern[str], where: str, hint: str) -> str:
    _require(regex.fullmatch(value) is not None, f"{where} {value!r} is not valid: {hint}", where)
    return value


def _build(source: dict[str, Any]) -> LabTemplate:
    _name(source["name"], TEMPLATE_NAME_RE, "name", f"{_HINTS['name']}, at most 31 characters")

    networks: list[NetworkTemplate] = []
    for i, net in enumerate(source.get("networks", [])):
        where = f"networks[{i}]"
        name = _name(
            net["name"],
            NETWORK_NAME_RE,
            f"{where}.name",
            f"{_HINTS['name']}, at most 15 characters",
        )
        _require(
            all(n.name != name for n in networks),
            f"two networks are named '{name}'",
            f"{where}.name",
        )
        cidr = _cidr(net["cidr"], f"{where}.cidr", name)
        for other in networks:
            _require(
                not cidr.overlaps(other.cidr),
                f"network '{name}' ({cidr}) overlaps network '{other.name}' ({other.cidr})",
                f"{where}.cidr",
                BAD_ADDRESS,
            )
        networks.append(NetworkTemplate(name, cidr))
    by_name = {n.name: n for n in networks}

    machines: list[MachineTemplate] = []
    instance_names: dict[str, str] = {}  # instance name -> machine name
    for i, m in enumerate(source["machines"]):
        where = f"machines[{i}]"
        name = _name(
            m["name"], MACHINE_NAME_RE, f"{where}.name", f"{_HINTS['name']}, at most 21 characters"
        )
        _require(
            all(x.name != name for x in machines),
            f"two machines are named '{name}'",
            f"{where}.name",
        )
        image = _name(m["image"], IMAGE_NAME_RE, f"{where}.image", _HINTS["image"])
        count = int(m.get("count", 1))
        nics: list[NICTemplate] = []
        for j, nic in enumerate(m.get("networks", [])):
            nic_where = f"{where}.networks[{j}]"
            net_name = nic["network"]
            defined = ", ".join(f"'{n}'" for n in by_name) or "none"
            _require(
                NETWORK_NAME_RE.fullmatch(net_name) is not None and net_name in by_name,
                f"machine '{name}' is on network {net_name!r}, which the template does not "
                f"define (its networks: {defined})",
                f"{nic_where}.network",
                UNKNOWN_NETWORK,
            )
            _require(
                all(x.network != net_name for x in nics),
                f"machine '{name}' is on network '{net_name}' twice",
                f"{nic_where}.network",
            )
            address = None
            if "address" in nic:
                address = _address(nic["address"], f"{nic_where}.address")
            nics.append(NICTemplate(net_name, address))
        machine = MachineTemplate(
            name=name,
            image=image,
            cpu=_optional_int(m.get("cpu")),
            ram=_optional_int(m.get("ram")),
            disk=_optional_int(m.get("disk")),
            count=count,
            networks=tuple(nics),
        )
        for instance in machine.instance_names():
            _require(
                instance not in instance_names,
                f"machine '{name}' would make the instance '{instance}', which is already "
                f"a machine of the template ('{instance_names.get(instance)}')",
                f"{where}.name",
            )
            instance_names[instance] = name
        machines.append(machine)
    total = sum(m.count for m in machines)
    _require(
        total <= MAX_INSTANCES,
        f"the template makes {total} machines; at most {MAX_INSTANCES} are allowed",
        "machines",
    )

    checks: list[CheckTemplate] = []
    for i, c in enumerate(source.get("checks", [])):
        where = f"checks[{i}]"
        name = _name(
            c["name"], CHECK_NAME_RE, f"{where}.name", "one line of at most 100 characters"
        )
        _require(
            all(x.name != name for x in checks), f"two checks are named '{name}'", f"{where}.name"
        )
        machine_name = c["machine"]
        _require(
            machine_name in instance_names,
            f"check '{name}' runs on machine {machine_name!r}, which the template does not "
            f"make (its machines: {', '.join(instance_names)})",
            f"{where}.machine",
        )
        run = c["run"]
        _require(
            len(run) <= MAX_RUN_CHARS,
            f"the command of check '{name}' is longer than {MAX_RUN_CHARS} characters",
            f"{where}.run",
        )
        expect = c.get("expect")
        if expect is not None:
            try:
                re.compile(expect)
            except re.error as e:
                raise ValidationFailed(
                    f"check '{name}' expects {expect!r}, which is not a valid regular "
                    f"expression: {e}",
                    f"{where}.expect",
                    INVALID,
                ) from None
        checks.append(
            CheckTemplate(
                name=name,
                machine=machine_name,
                run=run,
                expect=expect,
                exit_code=int(c.get("exit_code", 0)),
                points=_number(c.get("points", DEFAULT_POINTS)),
                timeout=_number(c.get("timeout", DEFAULT_TIMEOUT)),
            )
        )

    return LabTemplate(
        schema=source["schema"],
        name=source["name"],
        title=source.get("title"),
        description=source.get("description"),
        networks=tuple(networks),
        machines=tuple(machines),
        checks=tuple(checks),
        source=source,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _number(value: Any) -> int | float:
    """An integral value as an int (1.0 -> 1), so equal templates compare and dump equal."""
    return int(value) if float(value).is_integer() else float(value)


def _cidr(text: str, where: str, name: str) -> ipaddress.IPv4Network:
    try:
        cidr = ipaddress.IPv4Network(text)
    except ValueError as e:
        reason = "it has host bits set" if "host bits" in str(e) else "it is not a network"
        raise ValidationFailed(
            f"network '{name}' has the cidr {text!r}, but {reason} (like 10.77.0.0/24)",
            where,
            BAD_ADDRESS,
        ) from None
    _require(
        any(cidr.subnet_of(p) for p in PRIVATE_NETWORKS),
        f"network '{name}' ({cidr}) is not private: use 10.0.0.0/8, 172.16.0.0/12 or "
        "192.168.0.0/16",
        where,
        BAD_ADDRESS,
    )
    _require(
        MIN_PREFIX <= cidr.prefixlen <= MAX_PREFIX,
        f"network '{name}' ({cidr}) must be between /{MIN_PREFIX} and /{MAX_PREFIX}",
        where,
        BAD_ADDRESS,
    )
    return cidr


def _address(text: str, where: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise ValidationFailed(
            f"{text!r} is not an IPv4 address (like 10.77.0.11)", where, BAD_ADDRESS
        ) from None


def _expand(template: LabTemplate) -> list[MachineInstance]:
    """The instances of ``template``: given addresses are checked and reserved first, then
    every NIC without one gets the first free host address from ``.10`` upward (then
    below ``.10`` in a network too small for that)."""
    nets = {n.name: n.cidr for n in template.networks}
    taken: dict[str, set[ipaddress.IPv4Address]] = {n: set() for n in nets}
    # (machine index, instance number, NIC index) -> address
    chosen: dict[tuple[int, int, int], ipaddress.IPv4Address] = {}
    for i, machine in enumerate(template.machines):
        for j, nic in enumerate(machine.networks):
            if nic.address is None:
                continue
            where = f"machines[{i}].networks[{j}].address"
            cidr = nets[nic.network]
            for k in range(machine.count):
                address = nic.address + k
                label = machine.instance_names()[k]
                _require(
                    address in cidr,
                    f"machine '{label}' has the address {address}, which is outside network "
                    f"'{nic.network}' ({cidr})",
                    where,
                    BAD_ADDRESS,
                )
                _require(
                    address not in (cidr.network_address, cidr.broadcast_address),
                    f"machine '{label}' has the address {address}, which is the "
                    f"{'network' if address == cidr.network_address else 'broadcast'} "
                    f"address of network '{nic.network}' ({cidr}), not a host's",
                    where,
                    BAD_ADDRESS,
                )
                _require(
                    address not in taken[nic.network],
                    f"machine '{label}' has the address {address}, which another machine "
                    f"of network '{nic.network}' already has",
                    where,
                    BAD_ADDRESS,
                )
                taken[nic.network].add(address)
                chosen[(i, k, j)] = address
    for i, machine in enumerate(template.machines):
        for k in range(machine.count):
            for j, nic in enumerate(machine.networks):
                if nic.address is None:
                    chosen[(i, k, j)] = _first_free(
                        nets[nic.network],
                        taken[nic.network],
                        nic.network,
                        machine.instance_names()[k],
                        f"machines[{i}].networks[{j}]",
                    )

    instances = []
    for i, machine in enumerate(template.machines):
        for k, name in enumerate(machine.instance_names()):
            index = len(instances)
            nics = tuple(
                NICInstance(
                    network=nic.network,
                    address=chosen[(i, k, j)],
                    prefix=nets[nic.network].prefixlen,
                    mac=_mac(index, j),
                )
                for j, nic in enumerate(machine.networks)
            )
            instances.append(
                MachineInstance(
                    name=name,
                    machine=machine.name,
                    image=machine.image,
                    cpu=machine.cpu,
                    ram=machine.ram,
                    disk=machine.disk,
                    nics=nics,
                )
            )
    return instances


def _first_free(
    cidr: ipaddress.IPv4Network,
    taken: set[ipaddress.IPv4Address],
    network: str,
    machine: str,
    where: str,
) -> ipaddress.IPv4Address:
    first = cidr.network_address + 1
    last = cidr.broadcast_address - 1
    start = cidr.network_address + FIRST_AUTO_HOST
    order = [(start, last), (first, start - 1)] if start <= last else [(first, last)]
    for low, high in order:
        address = low
        while address <= high:
            if address not in taken:
                taken.add(address)
                return address
            address += 1
    raise ValidationFailed(
        f"network '{network}' ({cidr}) has no free address left for machine '{machine}'",
        where,
        BAD_ADDRESS,
    )


# -- the catalogue ------------------------------------------------------------------------


class TemplateCatalogue:
    """The templates of a folder (``*.yaml``, ``*.yml``), read afresh on every call.

    A template is found by its ``name``; its file should be called ``<name>.yaml``.
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)

    def _files(self) -> list[Path]:
        try:
            found = [p for p in self.folder.iterdir() if p.suffix in (".yaml", ".yml")]
        except OSError as e:
            log.warning("lab templates folder %s cannot be read: %s", self.folder, e)
            return []
        return sorted(p for p in found if p.is_file())

    @staticmethod
    def _read(path: Path) -> LabTemplate:
        try:
            if path.stat().st_size > MAX_TEXT_CHARS * 4:
                raise ValidationFailed(
                    f"the template file {path.name} is too large", "template", INVALID
                )
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValidationFailed(
                f"the template file {path.name} cannot be read: {e}", "template", INVALID
            ) from None
        return parse_template(text)

    def _good(self) -> Iterator[tuple[Path, LabTemplate]]:
        for path in self._files():
            try:
                yield path, self._read(path)
            except ValidationFailed as e:
                log.warning("lab template %s skipped: %s (%s)", path, e.message, e.field)

    def list(self) -> list[LabTemplate]:
        """The valid templates by name (a bad file is skipped with a warning in the log;
        of two templates of one name, the first file's)."""
        found: dict[str, LabTemplate] = {}
        for path, template in self._good():
            if template.name in found:
                log.warning(
                    "lab template %s skipped: another file already defines '%s'",
                    path,
                    template.name,
                )
                continue
            found[template.name] = template
        return [found[name] for name in sorted(found)]

    def get(self, name: str) -> LabTemplate:
        """The template named ``name``: raises its ``ValidationFailed`` if its file
        (``<name>.yaml``) is bad, ``NotFound`` (``no_template``) if there is none."""
        if isinstance(name, str) and TEMPLATE_NAME_RE.fullmatch(name):
            for suffix in (".yaml", ".yml"):
                path = self.folder / f"{name}{suffix}"
                if path.is_file():
                    template = self._read(path)
                    if template.name == name:
                        return template
            for _, template in self._good():
                if template.name == name:
                    return template
        raise NotFound(f"there is no lab template named {name!r}", "no_template")
