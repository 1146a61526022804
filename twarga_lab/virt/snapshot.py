"""Snapshot XML built from objects, and the facts Twarga reads back from libvirt's.

A Twarga snapshot is a libvirt *internal* snapshot of the VM's qcow2 overlay (``vda``);
every other disk (the read-only seeds) is left out. A running VM's snapshot holds its
memory too, so reverting to it resumes the guest where it was.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime

#: The disk whose state a snapshot keeps: the VM's own qcow2 overlay.
SNAPSHOT_DISK = "vda"


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as ``HypervisorBackend.snapshots`` lists it."""

    name: str
    created_at: datetime
    state: str  # the domain's state when it was taken: running, shutoff, paused ...


def disk_targets(domain_xml: str) -> list[str]:
    """The target names (vda, sda ...) of every disk and CD-ROM of a domain."""
    root = ET.fromstring(domain_xml)
    targets = []
    for disk in root.iterfind("devices/disk"):
        target = disk.find("target")
        if target is not None and target.get("dev"):
            targets.append(str(target.get("dev")))
    return targets


def build_snapshot_xml(name: str, description: str, disks: list[str], *, running: bool) -> str:
    """The ``<domainsnapshot>`` document for an internal snapshot of ``vda`` alone.

    ``running`` adds the guest's memory (an internal system checkpoint); a stopped VM gets
    a disk-only internal snapshot.
    """
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    ET.SubElement(root, "memory", {"snapshot": "internal" if running else "no"})
    disks_element = ET.SubElement(root, "disks")
    for target in disks:
        mode = "internal" if target == SNAPSHOT_DISK else "no"
        ET.SubElement(disks_element, "disk", {"name": target, "snapshot": mode})
    return ET.tostring(root, encoding="unicode")


def parse_snapshot_xml(xml: str) -> SnapshotInfo:
    """Name, creation time and domain state of a libvirt snapshot description."""
    root = ET.fromstring(xml)
    created = int(root.findtext("creationTime") or 0)
    return SnapshotInfo(
        name=root.findtext("name") or "",
        created_at=datetime.fromtimestamp(created, UTC),
        state=root.findtext("state") or "unknown",
    )
