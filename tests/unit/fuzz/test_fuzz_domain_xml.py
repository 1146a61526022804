"""The domain-XML builder under hostile input: names, paths, kernel arguments, MACs and
metadata values made of quotes, ``<``, ``&``, ``]]>``, newlines, NUL, unicode and very long
text. Either the spec refuses the value (ValueError) or the XML parses, holds exactly the
elements and attributes we built, every value reads back equal in its own place, and no
QEMU command-line word gains an option from a value."""

from __future__ import annotations

import operator
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.fuzz import fuzz, ran
from twarga_lab.virt.domain import (
    QEMU_NS,
    TWARGA_NS,
    USER_NET_MAC,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    SegmentNICSpec,
    UserNetSpec,
    build_domain_xml,
    read_twarga_metadata,
)

# Pieces that have broken XML builders and command lines before.
HOSTILE = [
    '"', "'", "<", ">", "&", "]]>", "<![CDATA[", "-->", "<!--", "&amp;", "&#0;", "&lt;",
    "\n", "\r", "\r\n", "\t", "\x00", "\x01", "\x1f", "\x7f", "\x85", "\u2028", "\ufeff",
    "\ufffe", "\uffff", "\ud800", "\udcff", "é", "☃", "😀", "\U0010ffff", ",", ",,", "=",
    " ", "/", "..", "$", "`", "\\", "a=\"1\" b", "</name><devices>", "?>", "<?xml ",
    "xmlns:x=", "{", "}", "%s", "-device", ",sock=/tmp/evil", "id=x", "script=/bin/sh",
]  # fmt: skip
HOSTILE_CHARS = sorted({c for piece in HOSTILE for c in piece})
# Single characters (any, or one of the pieces'), whole pieces, and one piece repeated into a
# very long value: three cheap strategies (a list of one_of(...) costs twice as much).
hostile_text = st.one_of(
    st.text(st.characters() | st.sampled_from(HOSTILE_CHARS), max_size=40),
    st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join),
    st.tuples(st.sampled_from(HOSTILE), st.integers(200, 3000)).map(lambda p: p[0] * p[1]),
)
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def word(first: str, rest: str, max_size: int) -> st.SearchStrategy[str]:
    """A word of ``rest`` after one character of ``first`` (cheaper than from_regex)."""
    return st.builds(operator.add, st.sampled_from(first), st.text(rest, max_size=max_size))


valid_name = word(ALNUM, ALNUM + "_.-", 40)
# Hostile text XML can carry (quotes, <, &, ]]>, LF, tab, unicode, very long): what a check
# must let through and the builder must escape. Written apart from the builder's own check.
NOT_XML = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")
xml_text = hostile_text.map(lambda t: NOT_XML.sub("", t))
valid_mac = st.lists(st.integers(0, 255), min_size=3, max_size=3).map(
    lambda b: "52:54:00:" + ":".join(f"{x:02x}" for x in b)
)
cmdline_key = word("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz0123456789_.", 12)
cmdline_value = st.text(ALNUM + "_.,:/@+-", max_size=20)
metadata_key = word(ALNUM[:52] + "_", ALNUM + "_.-", 20)
channel_name = word("abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz0123456789._-", 20)


def paths(text: st.SearchStrategy[str]) -> st.SearchStrategy[Path]:
    return st.one_of(
        st.builds(lambda t: Path("/" + t), text),
        st.builds(lambda a, b: Path("/var/lib/twarga", a, b), valid_name, valid_name),
    )


#: Each field of a spec: (what the checks allow, hostile). A spec takes one field, or all
#: of them at once, from the hostile side, so that most specs get built and every field is
#: hostile in many of them.
FIELDS: dict[str, tuple[st.SearchStrategy[object], st.SearchStrategy[object]]] = {
    "name": (valid_name, st.one_of(hostile_text, valid_name.map(lambda n: n + "\n"))),
    "path": (paths(xml_text), paths(hostile_text)),
    # The switch folder is also a QEMU option value: no comma, no line break.
    "switch": (paths(xml_text.map(lambda t: re.sub("[,\\n]", "", t))), paths(hostile_text)),
    "mac": (valid_mac, st.one_of(hostile_text, valid_mac.map(str.upper), st.just(USER_NET_MAC))),
    "cmdline": (
        st.tuples(cmdline_key, cmdline_value),
        st.tuples(st.one_of(cmdline_key, hostile_text), st.one_of(cmdline_value, hostile_text)),
    ),
    "metadata": (
        st.dictionaries(metadata_key, xml_text, max_size=4),
        st.dictionaries(st.one_of(metadata_key, hostile_text), hostile_text, max_size=4),
    ),
    "text": (xml_text, hostile_text),  # owner and UUID
    "channel": (channel_name, hostile_text),
}
hostile_field = st.sampled_from([*FIELDS, "all"])


def attempt(build, *args, **kwargs):  # type: ignore[no-untyped-def]
    """The spec, or None when its constructor refuses the values (the one allowed way out)."""
    try:
        return build(*args, **kwargs)
    except ValueError:
        return None


# Strategies are built once: one made inside a draw is validated again at every draw.
targets = st.lists(st.sampled_from(["vda", "vdb", "hdc", "sda"]), max_size=3, unique=True)
disk_rest = st.tuples(
    st.sampled_from(["qcow2", "raw"]), st.sampled_from(["disk", "cdrom"]),
    st.sampled_from(["virtio", "ide"]), st.booleans(),
)  # fmt: skip
counts = st.integers(0, 3)
maybe = st.booleans()
networks = st.none() | st.builds(UserNetSpec, st.none() | st.integers(1024, 65535), st.booleans())
memory, vcpus = st.integers(64, 4096), st.integers(1, 8)
domain_types = st.sampled_from(["qemu", "kvm", "test"])
vm_ids = st.none() | st.integers(0, 2**31)


@st.composite
def domain_specs(draw: st.DrawFn) -> DomainSpec | None:
    hostile = draw(hostile_field)

    def pick(field: str) -> Any:
        valid, bad = FIELDS[field]
        return draw(bad if hostile in (field, "all") else valid)

    def maybe_pick(field: str) -> Any:
        return pick(field) if draw(maybe) else None

    disks = []
    for target in draw(targets):
        disk = attempt(DiskSpec, pick("path"), target, *draw(disk_rest))
        if disk is None:
            return None
        disks.append(disk)
    channels = []
    for _ in range(draw(counts) % 3):
        channel = attempt(ChannelSpec, pick("channel"), maybe_pick("path"))
        if channel is None:
            return None
        channels.append(channel)
    segments = []
    for i in range(draw(counts)):
        nic = attempt(SegmentNICSpec, pick("switch"), pick("mac"), 10 + i)
        if nic is None:
            return None
        segments.append(nic)
    kernel = maybe_pick("path")
    return attempt(
        DomainSpec,
        name=pick("name"),
        memory_mib=draw(memory),
        vcpus=draw(vcpus),
        domain_type=draw(domain_types),
        uuid=maybe_pick("text"),
        kernel=kernel,
        initrd=maybe_pick("path") if kernel is not None else None,
        cmdline=tuple(pick("cmdline") for _ in range(draw(counts))),
        disks=tuple(disks),
        console_log=maybe_pick("path"),
        network=draw(networks),
        channels=tuple(channels),
        segments=tuple(segments),
        owner=maybe_pick("text"),
        vm_id=draw(vm_ids),
        metadata=pick("metadata") if draw(maybe) else {},
    )


def shape(element: ET.Element) -> tuple[object, ...]:
    """The structural summary: tag, attribute names and children's summaries, in order."""
    return (element.tag, tuple(sorted(element.attrib)), tuple(shape(c) for c in element))


def E(tag: str, attrs: tuple[str, ...] = (), *children: tuple[object, ...]) -> tuple[object, ...]:
    return (tag, tuple(sorted(attrs)), tuple(children))


def expected_shape(spec: DomainSpec) -> tuple[object, ...]:
    """What the domain must look like, written from the spec independently of the builder."""
    top: list[tuple[object, ...]] = [E("name")]
    if spec.uuid:
        top.append(E("uuid"))
    attrs = dict(spec.metadata)
    if spec.owner is not None:
        attrs["owner"] = spec.owner
    if spec.vm_id is not None:
        attrs["id"] = str(spec.vm_id)
    if spec.owner is not None or spec.vm_id is not None or spec.metadata:
        top.append(E("metadata", (), E(f"{{{TWARGA_NS}}}vm", tuple(attrs))))
    top += [E("memory", ("unit",)), E("currentMemory", ("unit",)), E("vcpu", ("placement",))]
    os_children = [E("type", ("arch", "machine"))]
    if spec.kernel is not None:
        os_children.append(E("kernel"))
        if spec.initrd is not None:
            os_children.append(E("initrd"))
        if spec.cmdline:
            os_children.append(E("cmdline"))
    else:
        os_children.append(E("boot", ("dev",)))
    top += [E("os", (), *os_children), E("features", (), E("acpi"), E("apic")),
            E("clock", ("offset",)), E("on_poweroff"), E("on_reboot"), E("on_crash")]  # fmt: skip
    devices = []
    for disk in spec.disks:
        kids = [E("driver", ("name", "type")), E("source", ("file",)), E("target", ("dev", "bus"))]
        if disk.readonly or disk.device == "cdrom":
            kids.append(E("readonly"))
        devices.append(E("disk", ("type", "device"), *kids))
    serial = [E("log", ("file", "append"))] if spec.console_log is not None else []
    devices.append(E("serial", ("type",), *serial, E("target", ("port",))))
    devices.append(E("console", ("type",), E("target", ("type", "port"))))
    for ch in spec.channels:
        source = ("mode", "path") if ch.path is not None else ("mode",)
        devices.append(E("channel", ("type",), E("source", source), E("target", ("type", "name"))))
    devices += [E("memballoon", ("model",)), E("rng", ("model",), E("backend", ("model",)))]
    top.append(E("devices", (), *devices))
    nargs = (4 if spec.network is not None else 0) + 4 * len(spec.segments)
    if nargs:
        arg = E(f"{{{QEMU_NS}}}arg", ("value",))
        top.append(E(f"{{{QEMU_NS}}}commandline", (), *[arg] * nargs))
    return E("domain", ("type",), *top)


def options(word: str) -> list[str]:
    """The option names of a QEMU ``-netdev``/``-device`` word (``kind,key=value,...``)."""
    return [part.partition("=")[0] for part in word.split(",")[1:]]


def check_values(spec: DomainSpec, root: ET.Element) -> None:
    """Every value of ``spec`` reads back equal, in its own element or attribute."""
    assert root.get("type") == spec.domain_type
    assert root.findtext("name") == spec.name
    assert root.findtext("uuid") == (spec.uuid or None)
    assert root.findtext("memory") == str(spec.memory_mib)
    assert root.findtext("vcpu") == str(spec.vcpus)
    expected = dict(spec.metadata)
    if spec.owner is not None:
        expected["owner"] = spec.owner
    if spec.vm_id is not None:
        expected["id"] = str(spec.vm_id)
    assert read_twarga_metadata(ET.tostring(root, encoding="unicode")) == expected
    if spec.kernel is not None:
        assert root.findtext("os/kernel") == str(spec.kernel)
        assert root.findtext("os/initrd") == (str(spec.initrd) if spec.initrd else None)
        words = (root.findtext("os/cmdline") or "").split(" ") if spec.cmdline else []
        assert [tuple(w.partition("=")[::2]) for w in words] == list(spec.cmdline)
    disks = root.findall("devices/disk")
    for disk, el in zip(spec.disks, disks, strict=True):
        assert el.find("source").get("file") == str(disk.path)  # type: ignore[union-attr]
        assert el.find("target").get("dev") == disk.target  # type: ignore[union-attr]
    log = root.find("devices/serial/log")
    assert (log.get("file") if log is not None else None) == (
        str(spec.console_log) if spec.console_log is not None else None
    )
    for ch, el in zip(spec.channels, root.findall("devices/channel"), strict=True):
        assert el.find("target").get("name") == ch.name  # type: ignore[union-attr]
        path = el.find("source").get("path")  # type: ignore[union-attr]
        assert path == (str(ch.path) if ch.path is not None else None)
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    words: list[str] = args[1::2]
    assert args[0::2] == ["-netdev", "-device"] * (len(args) // 4)
    if spec.network is not None:
        netdev, device = words[:2]
        words = words[2:]
        fwd = ["hostfwd"] if spec.network.ssh_host_port is not None else []
        assert options(netdev) == ["id", "restrict", *fwd]
        assert options(device) == ["netdev", "bus", "addr"]
    for nic, netdev, device in zip(spec.segments, words[0::2], words[1::2], strict=True):
        # The switch folder is the sock option's whole value, and adds no option of its own.
        assert netdev.split(",")[0] == "vde" and options(netdev) == ["id", "sock"]
        assert netdev.split(",", 2)[2] == f"sock={nic.switch}"
        assert options(device) == ["netdev", "mac", "bus", "addr"]
        assert f",mac={nic.mac}," in device


def check_domain(spec: DomainSpec) -> None:
    xml = build_domain_xml(spec)
    root = ET.fromstring(xml)
    assert shape(root) == expected_shape(spec)
    check_values(spec, root)


@fuzz(8_000)
@given(domain_specs())
def test_hostile_domain_specs_are_refused_or_build_exactly_what_was_asked(spec):
    ran("domain: hostile specs")
    if spec is not None:
        ran("domain: hostile specs (built, not refused)")
        check_domain(spec)


@fuzz(1_500)
@given(
    name=valid_name,
    kernel=FIELDS["path"][0],
    disk=FIELDS["path"][0],
    switch=FIELDS["switch"][0],
    words=st.lists(FIELDS["cmdline"][0], max_size=6),
    meta=FIELDS["metadata"][0],
    owner=FIELDS["text"][0],
)
def test_values_the_checks_allow_are_never_refused(name, kernel, disk, switch, words, meta, owner):
    """The refusals above are not the whole story: text the checks allow always builds."""
    ran("domain: allowed values build")
    spec = DomainSpec(
        name=name, memory_mib=256, vcpus=1, kernel=kernel, cmdline=tuple(words),
        disks=(DiskSpec(disk),), console_log=kernel, channels=(ChannelSpec("org.x.0", disk),),
        network=UserNetSpec(2222), segments=(SegmentNICSpec(switch, "52:54:00:0a:00:01", 10),),
        owner=owner, vm_id=7, metadata=meta,
    )  # fmt: skip
    check_domain(spec)


def test_a_metadata_key_cannot_add_an_attribute():
    # Found by the property above: ElementTree writes attribute names as they are.
    assert attempt(DomainSpec, "a", 64, 1, metadata={'a="1" b': "v"}) is None
    assert attempt(DomainSpec, "a", 64, 1, owner="x\x00") is None
    assert attempt(DiskSpec, Path("/d\x01")) is None
