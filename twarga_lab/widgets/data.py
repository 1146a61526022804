"""Data shaping for the dashboards: pure functions from the client's answers to table rows,
chart series and messages. No widgets, no HTTP: the tests call them directly."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from twarga_lab.client import (
    BadRequest,
    Conflict,
    QuotaExceeded,
    ServiceUnavailable,
    TwargaAPIError,
)

SEVERITIES = ("info", "warning", "critical")
EVENT_TYPES = ("vm", "auth", "system", "security")
SEVERITY_COLORS = {"info": "#1f77b4", "warning": "#ff7f0e", "critical": "#d62728"}
STATUS_COLORS = {
    "running": "#2ca02c",
    "pending": "#ff7f0e",
    "starting": "#ff7f0e",
    "stopping": "#ff7f0e",
    "destroying": "#ff7f0e",
    "paused": "#7f7f7f",
    "stopped": "#7f7f7f",
    "error": "#d62728",
    "unknown": "#9467bd",  # its host does not answer
}
# History windows of the monitor: the `since` the API understands and a step that gives
# a few hundred points (the finest the stored tiers hold for that window).
RANGES: dict[str, tuple[str, float | None]] = {
    "1h": ("-1h", None),
    "6h": ("-6h", 60.0),
    "24h": ("-24h", 300.0),
    "7d": ("-7d", 3600.0),
}
VM_COLUMNS = ("Name", "Status", "Ready", "IP", "SSH", "Uptime", "Size", "Image")
USER_COLUMNS = ("User", "Credits", "VMs", "RAM (MB)", "vCPUs", "Disk (GB)", "Active")
HOST_COLUMNS = (
    "Host", "State", "VMs", "RAM used / free (MB)", "vCPUs", "CPU", "Storage", "Guests",
)  # fmt: skip
HOST_COLORS = {"up": "#2ca02c", "draining": "#ff7f0e", "down": "#d62728"}
EVENT_COLUMNS = ("Time", "Severity", "Type", "Message", "User", "VM", "Source")
SNAPSHOT_COLUMNS = ("Name", "Taken", "State")
_QUOTED_FIELD = re.compile(r"^(?:unknown field )?'(\w+)'")


# -- formatting ---------------------------------------------------------------------------


def format_uptime(seconds: float | None) -> str:
    """``3d 04h``, ``2h 05m``, ``4m 10s``, ``12s``; a dash when the VM is not running."""
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_rate(bytes_per_s: float | None) -> str:
    """A byte rate for people: ``512 B/s``, ``1.5 KB/s``, ``3.2 MB/s``."""
    if bytes_per_s is None:
        return "—"
    value = float(bytes_per_s)
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if abs(value) < 1024 or unit == "GB/s":
            return f"{value:.0f} {unit}" if unit == "B/s" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB/s"  # pragma: no cover - the loop always returns


def format_credits(value: float | None) -> str:
    """Credits with at most two decimals."""
    return "—" if value is None else f"{float(value):,.2f}".rstrip("0").rstrip(".")


def _limit(used: Any, limit: Any) -> str:
    return f"{used} / {'∞' if limit is None else limit}"


def html_table(columns: Sequence[str], rows: Iterable[Mapping[str, Any]], empty: str) -> str:
    """An HTML table of ``rows`` (dicts keyed by column); cells are escaped unless they are
    :class:`Markup`."""
    rows = list(rows)
    if not rows:
        return f"<p class='twarga-empty'><i>{html.escape(empty)}</i></p>"
    head = "".join(
        f"<th style='text-align:left;padding:2px 8px'>{html.escape(c)}</th>" for c in columns
    )
    body = []
    for row in rows:
        cells = "".join(
            f"<td style='padding:2px 8px'>{_cell(row.get(column, ''))}</td>" for column in columns
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        "<table class='twarga-table' style='border-collapse:collapse'>"
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


class Markup(str):
    """HTML that :func:`html_table` puts into a cell as it is."""


def _cell(value: Any) -> str:
    if isinstance(value, Markup):
        return str(value)
    return html.escape("" if value is None else str(value))


def badge(text: str, color: str) -> Markup:
    """A coloured label."""
    return Markup(f"<span style='color:{color};font-weight:bold'>{html.escape(text)}</span>")


# -- VMs and users ------------------------------------------------------------------------


def ready_label(vm: Mapping[str, Any]) -> str:
    """The "Ready" cell of a VM: ``yes`` once its guest has reported in, ``booting…`` while
    it runs but has not, blank when it is not running. Without ``ready`` (a service from
    before it) a running VM is ready."""
    if vm.get("status") != "running":
        return ""
    return "yes" if vm.get("ready", True) else "booting…"


def vm_rows(vms: Iterable[Mapping[str, Any]], owner: bool = False) -> list[dict[str, Any]]:
    """Table rows of VMs (``VM.to_dict()`` shapes); ``owner`` adds the owner's column."""
    rows = []
    for vm in vms:
        status = vm.get("status") or "?"
        row: dict[str, Any] = {
            "Name": vm.get("name"),
            "Status": badge(status, STATUS_COLORS.get(status, "#333")),
            "Ready": ready_label(vm),
            "IP": vm.get("ip_address") or "—",
            "SSH": f"127.0.0.1:{vm['ssh_port']}" if vm.get("ssh_port") else "—",
            "Uptime": format_uptime(vm.get("uptime")) if status == "running" else "—",
            "Size": f"{vm.get('cpu')} vCPU · {vm.get('ram')} MB · {vm.get('disk')} GB",
            "Image": vm.get("image") or "",
        }
        if owner:
            row["Owner"] = vm.get("owner")
            row["Host"] = vm.get("host") or ""  # admins: which hypervisor it is on
        if status in ("error", "unknown") and vm.get("status_message"):
            row["Status"] = Markup(
                row["Status"] + f" <small>{html.escape(vm['status_message'])}</small>"
            )
        rows.append(row)
    return rows


def vm_options(vms: Iterable[Mapping[str, Any]], owner: bool = False) -> list[tuple[str, int]]:
    """Dropdown options ``(label, id)`` for VMs."""
    options = []
    for vm in vms:
        label = f"{vm['owner']}/{vm['name']}" if owner else vm["name"]
        options.append((f"{label} ({vm.get('status')})", int(vm["id"])))
    return options


def snapshot_rows(snapshots: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table rows of a VM's snapshots (``vm.snapshots()`` records: name, created_at,
    state); the time is UTC, as the service gives it."""
    rows = []
    for snapshot in snapshots:
        state = str(snapshot.get("state") or "")
        rows.append(
            {
                "Name": snapshot.get("name"),
                "Taken": f"{_time_label(snapshot.get('created_at'))} UTC",
                "State": badge(state, STATUS_COLORS.get(state, "#555")),
            }
        )
    return rows


def account_summary(me: Mapping[str, Any]) -> str:
    """One line about me: name, credits, and quota use."""
    quota, usage = me.get("quota") or {}, me.get("usage") or {}
    parts = [
        f"<b>{html.escape(str(me.get('name', '?')))}</b>"
        + (" <small>(admin)</small>" if me.get("admin") else ""),
        f"<b>{format_credits(me.get('credits'))}</b> credits",
        f"VMs {_limit(usage.get('vms', 0), quota.get('max_vms'))}",
        f"RAM {_limit(usage.get('ram_mb', 0), quota.get('max_ram_mb'))} MB",
        f"vCPUs {_limit(usage.get('cpu', 0), quota.get('max_cpu'))}",
        f"disk {_limit(usage.get('disk_gb', 0), quota.get('max_disk_gb'))} GB",
    ]
    return " · ".join(parts)


def quota_use(me: Mapping[str, Any]) -> tuple[list[str], list[float]]:
    """Bars for the dashboard's chart: how much of each quota my VMs use, in percent."""
    quota, usage = me.get("quota") or {}, me.get("usage") or {}
    labels, percents = [], []
    for label, used, limit in (
        ("VMs", usage.get("vms", 0), quota.get("max_vms")),
        ("RAM", usage.get("ram_mb", 0), quota.get("max_ram_mb")),
        ("vCPUs", usage.get("cpu", 0), quota.get("max_cpu")),
        ("disk", usage.get("disk_gb", 0), quota.get("max_disk_gb")),
    ):
        if limit:
            labels.append(label)
            percents.append(round(100.0 * used / limit, 1))
    return labels, percents


def user_rows(users: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Admin table rows of users (``GET /admin/users`` shapes)."""
    rows = []
    for user in users:
        quota, usage = user.get("quota") or {}, user.get("usage") or {}
        rows.append(
            {
                "User": user.get("name"),
                "Credits": format_credits(user.get("credits")),
                "VMs": _limit(user.get("vm_count", usage.get("vms", 0)), quota.get("max_vms")),
                "RAM (MB)": _limit(usage.get("ram_mb", 0), quota.get("max_ram_mb")),
                "vCPUs": _limit(usage.get("cpu", 0), quota.get("max_cpu")),
                "Disk (GB)": _limit(usage.get("disk_gb", 0), quota.get("max_disk_gb")),
                "Active": "yes" if user.get("active", True) else "no",
            }
        )
    return rows


def host_rows(hosts: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Admin table rows of hypervisor hosts (``GET /hosts`` shapes)."""
    rows = []
    for host in hosts:
        state = str(host.get("state") or "")
        free = host.get("ram_free_mb")
        cpu = host.get("cpu_usage_percent")
        rows.append(
            {
                "Host": host.get("name"),
                "State": badge(state, HOST_COLORS.get(state, "#333")),
                "VMs": host.get("vms", 0),
                "RAM used / free (MB)": f"{host.get('ram_used_mb', 0)} / "
                + ("—" if free is None else str(free)),
                "vCPUs": f"{host.get('vcpus_used', 0)} / {host.get('vcpus') or '—'}",
                "CPU": "—" if cpu is None else f"{cpu:.0f} %",
                "Storage": host.get("storage", "shared"),
                "Guests": {"kvm": "KVM", "qemu": "TCG"}.get(host.get("domain_type") or "", "—"),
            }
        )
    return rows


# -- errors -------------------------------------------------------------------------------


def error_field(error: TwargaAPIError, fields: Iterable[str]) -> str | None:
    """Which form field an error of the service is about, or None for the whole form."""
    fields = set(fields)
    if error.field in fields:
        return error.field
    if isinstance(error, BadRequest):
        match = _QUOTED_FIELD.match(error.message)
        if match and match.group(1) in fields:
            return match.group(1)
    if isinstance(error, Conflict) and error.reason == "name_taken" and "name" in fields:
        return "name"
    if isinstance(error, QuotaExceeded) and error.reason == "quota_exceeded":
        text = error.message.lower()
        for field, word in (("ram", " ram"), ("cpu", "vcpu"), ("disk", " disk")):
            if word in text and field in fields:
                return field
    return None


def service_message(error: BaseException, interval: float | None = None) -> str:
    """The banner for a failed refresh: unreachable service, or the service's refusal."""
    retry = f" Retrying every {interval:g} s." if interval else ""
    if isinstance(error, ServiceUnavailable):
        return f"⚠ The Twarga Lab service is unavailable: {html.escape(error.message)}.{retry}"
    if isinstance(error, TwargaAPIError):
        return f"⚠ {html.escape(error.message)}"
    return f"⚠ {html.escape(type(error).__name__)}: {html.escape(str(error))}"


def parse_optional_int(text: str) -> int | None:
    """A quota field: empty means "the default" (None), otherwise a whole number >= 0."""
    text = (text or "").strip()
    if not text:
        return None
    if not re.fullmatch(r"\d+", text):
        raise ValueError("a whole number, or empty for the default")
    return int(text)


# -- metrics ------------------------------------------------------------------------------


def history_series(frame: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of a history DataFrame (``time``, ``value``): datetime64 and floats."""
    if frame is None or len(frame) == 0:
        return np.array([], dtype="datetime64[ms]"), np.array([], dtype=float)
    times = frame["time"]
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    x = times.to_numpy(dtype="datetime64[ms]")
    y = frame["value"].to_numpy(dtype=float)
    return x, y


def host_summary(host: Mapping[str, Any]) -> str:
    """The host's readings now, in one line."""
    cpu, memory = host.get("cpu", {}), host.get("memory", {})
    disk, net = host.get("disk", {}), host.get("network", {})
    return (
        f"CPU <b>{cpu.get('usage_percent', 0):.1f}%</b> of {cpu.get('count', '?')} · "
        f"memory <b>{memory.get('usage_percent', 0):.1f}%</b> "
        f"({memory.get('used_mb', 0):,.0f} / {memory.get('total_mb', 0):,.0f} MB) · "
        f"disk <b>{disk.get('usage_percent', 0):.1f}%</b> "
        f"({disk.get('used_gb', 0):.1f} / {disk.get('total_gb', 0):.1f} GB) · "
        f"network ↑ {format_rate(net.get('sent_bytes_per_s'))} "
        f"↓ {format_rate(net.get('recv_bytes_per_s'))}"
    )


def vm_summary(metrics: Mapping[str, Any]) -> str:
    """A VM's readings now, in one line."""
    return (
        f"<b>{html.escape(str(metrics.get('name', '?')))}</b> ({metrics.get('status', '?')}) · "
        f"CPU <b>{metrics.get('cpu_usage', 0):.1f}%</b> · "
        f"memory <b>{metrics.get('memory_usage', 0):.1f}%</b> · "
        f"disk <b>{metrics.get('disk_usage', 0):.1f}%</b> · "
        f"network ↑ {format_rate(metrics.get('network_tx_bytes_per_s'))} "
        f"↓ {format_rate(metrics.get('network_rx_bytes_per_s'))} · "
        f"up {format_uptime(metrics.get('uptime'))}"
    )


# -- SOC ----------------------------------------------------------------------------------


def merge_events(
    existing: Sequence[Mapping[str, Any]], new: Iterable[Mapping[str, Any]], limit: int
) -> list[dict[str, Any]]:
    """The newest ``limit`` events of both lists, newest first, each id once."""
    by_id = {int(e["id"]): dict(e) for e in existing}
    for event in new:
        by_id[int(event["id"])] = dict(event)
    return [by_id[i] for i in sorted(by_id, reverse=True)[:limit]]


def event_records(frame: Any) -> list[dict[str, Any]]:
    """The rows of a ``lab.soc.events()`` DataFrame as plain dicts."""
    if frame is None or len(frame) == 0:
        return []
    records = frame.to_dict("records")
    for record in records:
        for key, value in record.items():
            if isinstance(value, float) and math.isnan(value):
                record[key] = None
    return records


def _time_label(value: Any) -> str:
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value or "")[:19].replace("T", " ")


def event_rows(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """SOC table rows."""
    rows = []
    for event in events:
        severity = event.get("severity") or ""
        vm_id = event.get("vm_id")
        rows.append(
            {
                "Time": _time_label(event.get("created_at")),
                "Severity": badge(severity, SEVERITY_COLORS.get(severity, "#333")),
                "Type": event.get("type") or "",
                "Message": event.get("message") or "",
                "User": event.get("user_name") or "",
                "VM": "" if vm_id is None else str(int(vm_id)),
                "Source": event.get("source") or "",
            }
        )
    return rows


def count_bars(counts: Mapping[str, int], order: Sequence[str]) -> tuple[list[str], list[int]]:
    """Bar labels and heights: the known keys in ``order``, then any others."""
    labels = [k for k in order if k in counts] + sorted(k for k in counts if k not in order)
    return labels, [int(counts[k]) for k in labels]


def timeline(per_hour: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[int]]]:
    """Hour labels and, per severity, the counts of each hour (for stacked bars)."""
    labels = [str(bucket.get("start", ""))[11:16] or "?" for bucket in per_hour]
    stacks = [[int(bucket.get(severity, 0)) for bucket in per_hour] for severity in SEVERITIES]
    return labels, stacks


def note(text: str, color: str = "#333") -> str:
    """``text`` (HTML) as a coloured status line; nothing for no text."""
    return f"<span style='color:{color}'>{text}</span>" if text else ""
