"""Lab templates: the shipped ones parse, a bad template is refused saying where and why
in a sentence a student understands, and a machine with ``count`` > 1 becomes several VMs
with consecutive addresses and distinct MAC addresses."""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from twarga_lab.errors import NotFound, ValidationFailed
from twarga_lab.labs import SHIPPED_TEMPLATES
from twarga_lab.labs.template import (
    SCHEMA_PATH,
    TEMPLATE_SCHEMA,
    TEMPLATE_SCHEMA_ID,
    CheckTemplate,
    LabTemplate,
    TemplateCatalogue,
    load_schema,
    parse_template,
)

PAIR: dict[str, Any] = {
    "schema": "twarga-lab-template/v1",
    "name": "pair",
    "networks": [{"name": "lan", "cidr": "10.77.0.0/24"}],
    "machines": [
        {"name": "a", "image": "twarga/tiny", "networks": [{"network": "lan"}]},
        {
            "name": "b",
            "image": "twarga/tiny",
            "networks": [{"network": "lan", "address": "10.77.0.20"}],
        },
    ],
    "checks": [{"name": "a answers", "machine": "a", "run": "true"}],
}

PAIR_YAML = """\
schema: twarga-lab-template/v1
name: pair
networks:
  - {name: lan, cidr: 10.77.0.0/24}
machines:
  - name: a
    image: twarga/tiny
    networks: [{network: lan}]
  - name: b
    image: twarga/tiny
    networks:
      - network: lan
        address: 10.77.0.20
checks:
  - {name: a answers, machine: a, run: "true"}
"""


def changed(change) -> dict[str, Any]:
    template = copy.deepcopy(PAIR)
    change(template)
    return template


def refusal(data) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        parse_template(data)
    return caught.value


# -- the shipped templates --------------------------------------------------------------


def test_the_shipped_templates_parse() -> None:
    templates = {t.name: t for t in TemplateCatalogue(SHIPPED_TEMPLATES).list()}
    assert set(templates) == {"attack-defend", "web-db"}
    ad = templates["attack-defend"]
    assert ad.vm_count == 2
    assert [(n.name, str(n.cidr)) for n in ad.networks] == [("lan", "10.77.0.0/24")]
    assert {i.name: i.addresses for i in ad.instances()} == {
        "attacker": {"lan": "10.77.0.11"},
        "target": {"lan": "10.77.0.12"},
    }
    assert ad.checks[0] == CheckTemplate(
        name="attacker reaches target",
        machine="attacker",
        run="ping -c 1 -W 2 10.77.0.12",
        expect="1 packets received",
        exit_code=0,
        points=1,
        timeout=30,
    )
    web = {i.name: i for i in templates["web-db"].instances()}
    assert set(web) == {"client", "web", "db"}
    assert [n.network for n in web["web"].nics] == ["dmz", "backend"]
    for template in templates.values():
        template.check_images(lambda name: name == "twarga/tiny")


def test_the_shipped_templates_are_valid_for_the_json_schema_itself() -> None:
    schema = load_schema()
    assert schema["$id"] == TEMPLATE_SCHEMA_ID
    assert schema["properties"]["schema"]["const"] == TEMPLATE_SCHEMA
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    for path in sorted(SHIPPED_TEMPLATES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert not list(validator.iter_errors(data)), path
        assert path.stem == data["name"]
    assert SCHEMA_PATH.is_file() and SCHEMA_PATH.parent.parent == SHIPPED_TEMPLATES.parent
    json.loads(SCHEMA_PATH.read_text())


def test_the_catalogue_gets_by_name_and_says_which_name_is_missing() -> None:
    catalogue = TemplateCatalogue(SHIPPED_TEMPLATES)
    assert catalogue.get("web-db").title == "Web server and database"
    for name in ("no-such", "web-db\n", "../attack-defend", ""):
        with pytest.raises(NotFound) as caught:
            catalogue.get(name)
        assert caught.value.reason == "no_template"
        assert repr(name) in caught.value.message


def test_a_bad_file_is_skipped_by_list_but_get_says_what_is_wrong(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "pair.yaml").write_text(PAIR_YAML)
    (tmp_path / "broken.yaml").write_text(PAIR_YAML.replace("name: pair", "name: broken", 1)
                                          .replace("{network: lan}", "{network: dmz}"))  # fmt: skip
    (tmp_path / "garbage.yml").write_text("machines: [\n")
    (tmp_path / "notes.txt").write_text("not a template")
    catalogue = TemplateCatalogue(tmp_path)
    with caplog.at_level(logging.WARNING, logger="twarga_lab.labs.template"):
        assert [t.name for t in catalogue.list()] == ["pair"]
    skipped = caplog.text
    assert "broken.yaml" in skipped and "dmz" in skipped
    assert "garbage.yml" in skipped
    with pytest.raises(ValidationFailed) as caught:
        catalogue.get("broken")
    assert caught.value.reason == "unknown_network"
    assert caught.value.field == "machines[0].networks[0].network"
    with pytest.raises(ValidationFailed) as caught:
        catalogue.get("garbage")
    assert caught.value.reason == "invalid_template"
    assert "not valid YAML" in caught.value.message
    assert catalogue.get("pair") == parse_template(PAIR)
    assert TemplateCatalogue(tmp_path / "missing").list() == []


# -- one template, many forms -------------------------------------------------------------


def test_yaml_text_and_a_dict_give_equal_templates() -> None:
    from_text = parse_template(PAIR_YAML)
    from_dict = parse_template(PAIR)
    assert from_text == from_dict
    assert from_text.source == PAIR
    assert from_text.instances() == from_dict.instances()


def test_to_dict_round_trips() -> None:
    for template in [parse_template(PAIR), *TemplateCatalogue(SHIPPED_TEMPLATES).list()]:
        data = template.to_dict()
        again = parse_template(data)
        assert again == template
        assert again.to_dict() == data
        assert again.instances() == template.instances()
        assert json.loads(json.dumps(data)) == data  # what the database stores
    assert parse_template(PAIR).to_dict()["checks"] == [
        {"name": "a answers", "machine": "a", "run": "true", "exit_code": 0, "points": 1,
         "timeout": 30},
    ]  # fmt: skip


def test_yaml_anchors_and_merge_keys_may_share_settings() -> None:
    text = """\
schema: twarga-lab-template/v1
name: shared
x-tiny: &tiny {image: twarga/tiny, ram: 128, networks: [{network: lan}]}
networks: [{name: lan, cidr: 192.168.5.0/24}]
machines:
  - {<<: *tiny, name: one}
  - {<<: *tiny, name: two, ram: 256}
"""
    t = parse_template(text)
    assert [(m.name, m.image, m.ram) for m in t.machines] == [
        ("one", "twarga/tiny", 128),
        ("two", "twarga/tiny", 256),
    ]
    assert "x-tiny" in t.source and "x-tiny" not in t.to_dict()
    assert parse_template(t.to_dict()) == t


def test_the_source_is_a_copy_of_what_was_given() -> None:
    data = copy.deepcopy(PAIR)
    template = parse_template(data)
    data["machines"][0]["name"] = "changed"
    assert template.source["machines"][0]["name"] == "a"
    assert isinstance(template, LabTemplate)


# -- expansion ----------------------------------------------------------------------------


def test_omitted_addresses_are_the_first_free_from_10() -> None:
    t = parse_template(
        changed(
            lambda t: t["machines"][1]["networks"][0].update(address="10.77.0.10"),
        )
    )
    assert {i.name: i.addresses["lan"] for i in t.instances()} == {
        "a": "10.77.0.11",
        "b": "10.77.0.10",
    }
    assert [n.prefix for i in t.instances() for n in i.nics] == [24, 24]


def test_count_makes_numbered_instances_with_consecutive_addresses() -> None:
    def more(t: dict[str, Any]) -> None:
        t["machines"][0].update(count=3, cpu=2, ram=256)
        t["machines"][1].update(count=2)
        t["machines"].append(
            {"name": "c", "image": "twarga/tiny", "count": 2, "networks": [{"network": "lan"}]}
        )
        t["checks"] = [{"name": "second b", "machine": "b-2", "run": "true"}]

    t = parse_template(changed(more))
    instances = t.instances()
    assert [i.name for i in instances] == ["a-1", "a-2", "a-3", "b-1", "b-2", "c-1", "c-2"]
    assert [i.machine for i in instances] == ["a"] * 3 + ["b"] * 2 + ["c"] * 2
    assert [str(i.nics[0].address) for i in instances] == [
        "10.77.0.10", "10.77.0.11", "10.77.0.12",  # auto, from .10
        "10.77.0.20", "10.77.0.21",  # consecutive from the given address
        "10.77.0.13", "10.77.0.14",  # auto, after the others
    ]  # fmt: skip
    assert t.vm_count == 7
    assert (instances[0].cpu, instances[0].ram, instances[0].disk) == (2, 256, None)
    assert t.total((1, 128, 4)) == (3 * 2 + 4 * 1, 3 * 256 + 4 * 128, 7 * 4)


def test_mac_addresses_are_unique_and_derived_from_the_place_in_the_lab() -> None:
    def wide(t: dict[str, Any]) -> None:
        t["networks"] = [{"name": f"n{k}", "cidr": f"192.168.{k}.0/24"} for k in range(4)]
        t["machines"] = [
            {"name": "m", "image": "twarga/tiny", "count": 10,
             "networks": [{"network": f"n{k}"} for k in range(4)]},
        ]  # fmt: skip
        t["checks"] = []

    t = parse_template(changed(wide))
    macs = [nic.mac for i in t.instances() for nic in i.nics]
    assert len(macs) == 40 == len(set(macs))
    assert macs[0] == "52:54:00:7a:00:00"
    assert t.instances()[9].nics[3].mac == "52:54:00:7a:09:03"
    assert parse_template(t.to_dict()).instances() == t.instances()
    assert parse_template(PAIR).instances()[1].nics[0].mac == "52:54:00:7a:01:00"


def test_a_small_network_gives_low_addresses_when_10_is_outside_it() -> None:
    def small(t: dict[str, Any]) -> None:
        t["networks"][0]["cidr"] = "10.77.0.0/29"
        del t["machines"][1]["networks"][0]["address"]

    t = parse_template(changed(small))
    assert [str(i.nics[0].address) for i in t.instances()] == ["10.77.0.1", "10.77.0.2"]


# -- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "reason", "words"),
    [
        # the JSON Schema
        (lambda t: t.pop("name"), "name", "invalid_template", "needs 'name'"),
        (lambda t: t.update(schema="twarga-lab-template/v2"), "schema", "invalid_template",
         "twarga-lab-template/v1"),
        (lambda t: t.update(extra=1), "extra", "invalid_template", "unknown key 'extra'"),
        (lambda t: t["machines"][0].update(colour="red"), "machines[0].colour",
         "invalid_template", "unknown key 'colour'"),
        (lambda t: t["machines"][0].pop("image"), "machines[0].image", "invalid_template",
         "needs 'image'"),
        (lambda t: t["machines"][0].update(name="Web"), "machines[0].name", "invalid_template",
         "lower-case letters"),
        (lambda t: t["machines"][0].update(cpu="two"), "machines[0].cpu", "invalid_template",
         "must be an integer"),
        (lambda t: t["machines"][0].update(cpu=True), "machines[0].cpu", "invalid_template",
         "must be an integer"),
        (lambda t: t["machines"][0].update(count=11), "machines[0].count", "invalid_template",
         "at most 10"),
        (lambda t: t["machines"][0].update(count=0), "machines[0].count", "invalid_template",
         "at least 1"),
        (lambda t: t.update(machines=[]), "machines", "invalid_template", "at least 1"),
        (lambda t: t.update(networks=[{"name": f"n{k}", "cidr": f"10.{k}.0.0/24"}
                                      for k in range(5)]),
         "networks", "invalid_template", "at most 4"),
        (lambda t: t.update(checks=[{"name": f"c{k}", "machine": "a", "run": "true"}
                                    for k in range(51)]),
         "checks", "invalid_template", "at most 50"),
        (lambda t: t["checks"][0].update(run="x" * 4097), "checks[0].run", "invalid_template",
         "at most 4096 characters"),
        (lambda t: t["checks"][0].update(timeout=0), "checks[0].timeout", "invalid_template",
         "more than 0"),
        (lambda t: t["networks"][0].update(cidr="lan"), "networks[0].cidr", "bad_address",
         "like 10.77.0.0/24"),
        (lambda t: t["machines"][1]["networks"][0].update(address="10.77.0.20/24"),
         "machines[1].networks[0].address", "bad_address", "like 10.77.0.11"),
        (lambda t: t.update({"x-ok": 1, "y-not": 2}), "y-not", "invalid_template",
         "unknown key 'y-not'"),
        (lambda t: t.update(name="pair\n"), "name", "invalid_template", "is not valid"),
        (lambda t: t["machines"][0].update(name="web\n"), "machines[0].name", "invalid_template",
         "is not valid"),
        (lambda t: t["networks"][0].update(name="lan\n"), "networks[0].name",
         "invalid_template", "is not valid"),
        (lambda t: t["machines"][0].update(image="twarga/tiny\n"), "machines[0].image",
         "invalid_template", "is not valid"),
        (lambda t: t["checks"][0].update(name="two\nlines"), "checks[0].name",
         "invalid_template", "one line"),
        # names
        (lambda t: t["machines"][1].update(name="a"), "machines[1].name", "invalid_template",
         "two machines are named 'a'"),
        (lambda t: t["networks"].append({"name": "lan", "cidr": "10.78.0.0/24"}),
         "networks[1].name", "invalid_template", "two networks are named 'lan'"),
        (lambda t: t["checks"].append(dict(t["checks"][0])), "checks[1].name",
         "invalid_template", "two checks are named 'a answers'"),
        (lambda t: (t["machines"][0].update(count=2),
                    t["machines"][1].update(name="a-2")),
         "machines[1].name", "invalid_template", "'a-2'"),
        (lambda t: (t["machines"][0].update(count=6), t["machines"][1].update(count=5)),
         "machines", "invalid_template", "makes 11 machines; at most 10"),
        # checks
        (lambda t: t["checks"][0].update(machine="c"), "checks[0].machine", "invalid_template",
         "machine 'c', which the template does not make"),
        (lambda t: t["machines"][0].update(count=2), "checks[0].machine", "invalid_template",
         "its machines: a-1, a-2, b"),
        (lambda t: t["checks"][0].update(expect="(unclosed"), "checks[0].expect",
         "invalid_template", "not a valid regular expression"),
        # networks
        (lambda t: t["machines"][1]["networks"][0].update(network="dmz"),
         "machines[1].networks[0].network", "unknown_network",
         "machine 'b' is on network 'dmz', which the template does not define"),
        (lambda t: t["machines"][0]["networks"].append({"network": "lan"}),
         "machines[0].networks[1].network", "invalid_template", "on network 'lan' twice"),
        (lambda t: t["networks"][0].update(cidr="8.8.8.0/24"), "networks[0].cidr",
         "bad_address", "is not private"),
        (lambda t: t["networks"][0].update(cidr="100.64.0.0/24"), "networks[0].cidr",
         "bad_address", "is not private"),
        (lambda t: t["networks"][0].update(cidr="10.0.0.0/8"), "networks[0].cidr",
         "bad_address", "between /16 and /29"),
        (lambda t: t["networks"][0].update(cidr="10.77.0.0/30"), "networks[0].cidr",
         "bad_address", "between /16 and /29"),
        (lambda t: t["networks"][0].update(cidr="10.77.0.5/24"), "networks[0].cidr",
         "bad_address", "host bits set"),
        (lambda t: t["networks"][0].update(cidr="10.77.0.0/33"), "networks[0].cidr",
         "bad_address", "not a network"),
        (lambda t: t["networks"].append({"name": "big", "cidr": "10.77.0.0/16"}),
         "networks[1].cidr", "bad_address", "overlaps network 'lan'"),
        # addresses
        (lambda t: t["machines"][1]["networks"][0].update(address="10.78.0.1"),
         "machines[1].networks[0].address", "bad_address",
         "10.78.0.1, which is outside network 'lan' (10.77.0.0/24)"),
        (lambda t: t["machines"][1]["networks"][0].update(address="10.77.0.0"),
         "machines[1].networks[0].address", "bad_address", "the network address"),
        (lambda t: t["machines"][1]["networks"][0].update(address="10.77.0.255"),
         "machines[1].networks[0].address", "bad_address", "the broadcast address"),
        (lambda t: t["machines"][1]["networks"][0].update(address="10.77.0.300"),
         "machines[1].networks[0].address", "bad_address", "not an IPv4 address"),
        (lambda t: t["machines"][0]["networks"][0].update(address="10.77.0.20"),
         "machines[1].networks[0].address", "bad_address", "already has"),
        (lambda t: (t["machines"][1].update(count=2),
                    t["machines"][1]["networks"][0].update(address="10.77.0.254")),
         "machines[1].networks[0].address", "bad_address",
         "machine 'b-2' has the address 10.77.0.255, which is the broadcast address"),
        (lambda t: (t["networks"][0].update(cidr="10.77.0.0/29"),
                    t["machines"][0].update(count=6),
                    t["machines"][1]["networks"][0].pop("address"), t.update(checks=[])),
         "machines[1].networks[0]", "bad_address", "no free address left for machine 'b'"),
    ],
)  # fmt: skip
def test_a_bad_template_is_refused_saying_where_and_why(change, field, reason, words) -> None:
    error = refusal(changed(change))
    assert (error.field, error.reason) == (field, reason), error.message
    assert words in error.message
    assert error.status_code == 422


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("machines: [\n", "not valid YAML (line 2"),
        ("- a\n- b\n", "a mapping of keys"),
        ("", "a mapping of keys"),
        (PAIR_YAML + "name: again\n", "the key 'name' is given twice"),
        (7, "a mapping of keys"),
        (["schema"], "a mapping of keys"),
        ("x" * 300_000, "too long"),
        (
            "schema: twarga-lab-template/v1\nname: bomb\nb0: &b0 [x, x, x, x, x, x, x, x]\n"
            + "".join(f"b{k}: &b{k} [*b{k - 1}, *b{k - 1}, *b{k - 1}, *b{k - 1}, *b{k - 1},"
                      f" *b{k - 1}, *b{k - 1}, *b{k - 1}]\n" for k in range(1, 9))
            + "machines: *b8\n",
            "too large",
        ),
    ],
)  # fmt: skip
def test_what_is_not_a_template_at_all_is_refused(data, words) -> None:
    error = refusal(data)
    assert (error.field, error.reason) == ("template", "invalid_template")
    assert words in error.message


def test_unknown_images_are_refused_by_check_images() -> None:
    t = parse_template(changed(lambda t: t["machines"][1].update(image="nope/42")))
    asked: list[str] = []

    def exists(name: str) -> bool:
        asked.append(name)
        return name == "twarga/tiny"

    with pytest.raises(ValidationFailed) as caught:
        t.check_images(exists)
    assert (caught.value.field, caught.value.reason) == ("machines[1].image", "unknown_image")
    assert "'nope/42', which is not in the image catalogue" in caught.value.message
    assert asked == ["twarga/tiny", "nope/42"]


def test_instances_have_ipv4_addresses_and_integral_sizes() -> None:
    t = parse_template(changed(lambda t: t["machines"][0].update(cpu=2.0, ram=128)))
    a = t.instances()[0]
    assert a.cpu == 2 and isinstance(a.cpu, int)
    assert isinstance(a.nics[0].address, ipaddress.IPv4Address)
    assert a.nics[0].interface == ipaddress.IPv4Interface("10.77.0.10/24")
