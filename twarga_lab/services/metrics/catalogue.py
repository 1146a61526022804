"""What metrics exist (names, units, the seed's names), the thresholds' value object, and
the clock every part reads (patch ``catalogue.clock`` in tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

MB = 1024 * 1024
GB = 1024**3

# What the history API can read, per entity, with units for people.
HOST_METRICS = {
    "cpu_usage": "%",
    "memory_usage": "%",
    "swap_usage": "%",
    "disk_usage": "%",
    "disk_read_bytes_per_s": "B/s",
    "disk_write_bytes_per_s": "B/s",
    "net_sent_bytes_per_s": "B/s",
    "net_recv_bytes_per_s": "B/s",
}
VM_METRICS = {
    "cpu_usage": "%",
    "memory_usage": "%",
    "disk_usage": "%",
    "disk_read_bytes_per_s": "B/s",
    "disk_write_bytes_per_s": "B/s",
    "net_sent_bytes_per_s": "B/s",
    "net_recv_bytes_per_s": "B/s",
}
METRICS = {"host": HOST_METRICS, "vm": VM_METRICS}
THRESHOLD_LABELS = {
    "cpu_usage": "CPU usage",
    "memory_usage": "memory usage",
    "disk_usage": "disk usage",
}
# The seed's (Twarga Cloud's) metric names; ``network`` reads both directions.
SEED_METRICS = {
    "cpu": ("cpu_usage",),
    "memory": ("memory_usage",),
    "disk": ("disk_usage",),
    "network": ("net_sent_bytes_per_s", "net_recv_bytes_per_s"),
}
# How often the VM list is re-read from the database even without lifecycle events
# (a rename changes the labels, nothing else).
VM_INDEX_MAX_AGE = 60.0


def clock() -> float:
    """Now, in Unix seconds. Module level so tests can patch the collector's clock."""
    return time.time()


def iso(ts: float) -> str:
    """A Unix time as ISO 8601 UTC, like every other timestamp of the API."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


# -- configuration -----------------------------------------------------------------------


@dataclass(frozen=True)
class Thresholds:
    """Percentages that raise a warning once they hold for ``hold_seconds``."""

    cpu: float = 90.0
    memory: float = 90.0
    disk: float = 90.0
    hold_seconds: float = 60.0

    def limit(self, metric: str) -> float | None:
        return {"cpu_usage": self.cpu, "memory_usage": self.memory, "disk_usage": self.disk}.get(
            metric
        )
